"""Figures and the offline HTML report."""

from __future__ import annotations

import json
import re

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


def test_png_export_explains_what_is_missing(tmp_path):
    try:
        export_png(head_heatmap(torch.rand(2, 2), "m"), tmp_path / "f.png")
    except RuntimeError as error:
        assert "kaleido" in str(error) or "Chromium" in str(error)
    else:
        assert (tmp_path / "f.png").stat().st_size > 0
