"""Figures and the offline HTML report."""

from __future__ import annotations

import json
import re
import sys
import types

import plotly.graph_objects as go
import pytest
import torch

from deepalign.analysis.figures import comparison_heatmaps, figure_data, head_heatmap, position_lines, token_layer_map
from deepalign.analysis.report import Section, export_png, write_report


def test_figures_are_returned_with_their_data():
    a, b = torch.rand(3, 4), torch.rand(3, 4)
    heat = head_heatmap(a, "mass")
    assert isinstance(heat, go.Figure) and figure_data(heat)["traces"][0]["z"] == a.double().tolist()
    comparison = comparison_heatmaps(a, b, ("DA", "PRESTO"))
    assert len(comparison.data) == 3
    assert torch.allclose(torch.tensor(figure_data(comparison)["traces"][2]["z"], dtype=torch.float64), (b - a).double())
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0]])
    lines = position_lines({"KL": values}, "kl", yaxis="nats")
    assert figure_data(lines)["traces"][1]["y"] == [2.0, 3.0, 5.0]  # nan-aware mean per position
    assert token_layer_map(torch.rand(2, 3), ["a", "b", "c"], "t").data[0].x == ("0:a", "1:b", "2:c")
    with pytest.raises(ValueError, match=r"\[layers, 2 tokens\]"):
        token_layer_map(torch.rand(2, 3), ["a", "b"], "t")


def test_report_is_offline_escapes_model_text_and_writes_data(tmp_path):
    generation = "Sure! <script>alert('x')</script> & more"
    sections = [Section("Attention", ["mass per head"], head_heatmap(torch.rand(2, 2), "m")),
                Section("Samples", samples=[generation], table=[["<b>bold</b>", 1]], header=["text", "n"]),
                Section("Lines", figure=position_lines({"a": torch.rand(2, 4)}, "l", yaxis="y"))]
    path = write_report(tmp_path / "report.html", "Report <1>", sections)
    text = path.read_text()
    assert "<script>alert" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "Report &lt;1&gt;" in text
    assert not re.search(r"<script[^>]*\bsrc=", text)  # nothing is fetched: plotly.js is inline
    assert text.count("Plotly.newPlot") == 2 and len(text) > 1_000_000  # plotly.js embedded once
    data = json.loads((tmp_path / "report.html.json").read_text())
    assert set(data) == {"0: Attention", "2: Lines"}


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_png_export_without_kaleido_names_the_package_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kaleido", None)  # `import kaleido` raises ImportError
    with pytest.raises(RuntimeError) as raised:
        export_png(head_heatmap(torch.rand(2, 2), "m"), tmp_path / "f.png")
    message = str(raised.value)
    assert "kaleido" in message and "pip install" in message
    assert list(tmp_path.iterdir()) == []


def test_png_export_without_a_browser_names_chromium_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kaleido", types.ModuleType("kaleido"))  # importable

    def no_browser(self, *args, **kwargs):
        raise RuntimeError("BrowserFailedError: could not find a Chrome executable")

    monkeypatch.setattr(go.Figure, "write_image", no_browser)
    with pytest.raises(RuntimeError) as raised:
        export_png(head_heatmap(torch.rand(2, 2), "m"), tmp_path / "f.png")
    assert "Chromium" in str(raised.value) and "could not find a Chrome executable" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_png_export_writes_a_png_where_kaleido_and_a_browser_exist(tmp_path):
    pytest.importorskip("kaleido")
    path = tmp_path / "f.png"
    try:
        returned = export_png(head_heatmap(torch.rand(2, 2), "m"), path)
    except RuntimeError as error:
        if "Chromium" not in str(error):
            raise
        pytest.skip(f"kaleido is installed but has no browser: {error}")
    assert returned == path
    assert path.read_bytes()[:8] == PNG_MAGIC
