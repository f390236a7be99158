"""The report's figures read at a glance: distinct line colours and dashes, log ranks, bands inside
the quantity's range, titled colour bars, integer ticks, marked spans, one colour scale for compared
panels, and every table column explained."""

from __future__ import annotations

import math

import pytest
import torch

from deepalign.analysis.ablation import random_heads, top_heads
from deepalign.analysis.figures import comparison_heatmaps, head_heatmap, line_styles, position_lines, token_layer_map
from deepalign.analysis.report import Section, unexplained_columns, write_report

MODELS = ("base", "shallow", "da", "presto")
KINDS = ("harmful token", "best refusal token")


def rank_series(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    series = {}
    for model in MODELS:
        for kind in KINDS:
            ranks = torch.randint(0, 500, (6, 9), generator=generator).float() ** 1.3
            ranks[0, 7:] = float("nan")  # a shorter answer
            series[f"{model}: {kind}"] = ranks + 1
    return series


def lines_of(figure):
    return [trace for trace in figure.data if trace.mode == "lines"]


def bands_of(figure):
    return [trace for trace in figure.data if trace.fill == "toself"]


def test_every_line_has_its_own_colour_and_each_kind_its_own_dash():
    figure = position_lines(rank_series(), "ranks", yaxis="rank", log_y=True, band="quantile", low=1.0)
    lines = lines_of(figure)
    assert len(lines) == 8
    colours = [line.line.color for line in lines]
    assert len(set(colours)) == 8, colours  # no two of the eight lines share a colour
    dashes = {line.name.split(": ")[1]: set() for line in lines}
    for line in lines:
        dashes[line.name.split(": ")[1]].add(line.line.dash)
    assert all(len(d) == 1 for d in dashes.values()) and dashes["harmful token"] != dashes["best refusal token"]
    # A model's two lines are grouped in the legend; its band has the line's colour.
    assert {line.legendgroup for line in lines} == set(MODELS)
    for band, line in zip(bands_of(figure), lines):
        assert band.legendgroup == line.legendgroup and band.fillcolor.startswith("rgba(")
    styles = line_styles(["a", "b", "c"])
    assert len({s["color"] for s in styles.values()}) == 3


def test_ranks_are_on_a_log_axis_with_bands_at_or_above_rank_one():
    figure = position_lines(rank_series(), "ranks", yaxis="rank", log_y=True, band="quantile", low=1.0)
    assert figure.layout.yaxis.type == "log"
    assert figure.layout.yaxis.tickvals[:4] == (1, 2, 5, 10) and -0.05 <= figure.layout.yaxis.range[0] <= 0
    for band in bands_of(figure):
        assert min(y for y in band.y if not math.isnan(y)) >= 1.0
    assert "median" in figure.layout.title.text and "quantiles" in figure.layout.title.text


def test_std_bands_are_clipped_to_the_range_and_quantile_bands_hold_the_median():
    kl = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.1, 0.0], [3.0, 0.0, 0.0]])  # mean − std < 0 everywhere
    unclipped = position_lines({"KL": kl}, "kl", yaxis="nats")
    assert min(bands_of(unclipped)[0].y) < 0  # what the band showed before: KL below 0
    clipped = position_lines({"KL": kl}, "kl", yaxis="nats", low=0.0)
    assert min(bands_of(clipped)[0].y) >= 0.0
    assert lines_of(clipped)[0].y == lines_of(unclipped)[0].y  # the line (the mean) is unchanged
    quantile = position_lines({"KL": kl}, "kl", yaxis="nats", band="quantile")
    band, line = bands_of(quantile)[0], lines_of(quantile)[0]
    n = len(line.y)
    upper, lower = band.y[:n], band.y[n:][::-1]
    assert all(lo <= mid <= hi for lo, mid, hi in zip(lower, line.y, upper))
    with pytest.raises(ValueError, match="band must be one of"):
        position_lines({"KL": kl}, "kl", yaxis="nats", band="iqr")


def test_colour_bars_are_titled_and_head_and_layer_ticks_are_integers():
    a, b = torch.rand(4, 4), torch.rand(4, 4)
    heat = head_heatmap(a, "m", colorbar="mass on prefill")
    assert heat.data[0].colorbar.title.text == "mass on prefill"
    comparison = comparison_heatmaps(a, b, ("da", "presto"), colorbar="mass on prefill")
    shown = [trace for trace in comparison.data if trace.showscale is not False]
    assert len(shown) == 2 and all(trace.colorbar.title.text for trace in shown)
    assert "presto − da" in shown[-1].colorbar.title.text
    tokens = token_layer_map(torch.rand(3, 5), list("abcde"), "t")
    assert tokens.data[0].colorbar.title.text == "attention received"
    for figure, axes in ((heat, ("xaxis", "yaxis")), (comparison, ("xaxis", "yaxis", "xaxis2", "xaxis3")),
                         (tokens, ("yaxis",))):
        for name in axes:
            axis = figure.layout[name]
            assert axis.tickmode == "linear" and axis.dtick >= 1 and float(axis.dtick).is_integer(), name
    lines = position_lines({"x": torch.rand(2, 40)}, "t", yaxis="y")
    assert float(lines.layout.xaxis.dtick).is_integer() and lines.layout.xaxis.dtick >= 1


def test_compared_panels_share_one_colour_scale():
    a, b = torch.rand(2, 4) * 0.2, torch.rand(2, 4) + 0.5
    comparison = comparison_heatmaps(a, b, ("da", "presto"))
    first, second, difference = comparison.data
    assert (first.zmin, first.zmax) == (second.zmin, second.zmax)
    assert first.zmin == pytest.approx(float(a.min())) and first.zmax == pytest.approx(float(b.max()))
    assert difference.zmin == -difference.zmax  # the difference on a scale centred on 0
    maps = [token_layer_map(m, list("abcd"), "t", zmin=0.0, zmax=1.5) for m in (a, b)]
    assert {(m.data[0].zmin, m.data[0].zmax) for m in maps} == {(0.0, 1.5)}


def test_prefill_and_response_spans_are_marked_on_the_token_map():
    tokens = ["<s>", "user", "how", "asst", "Sure", "here", "step", "one", "two"]
    figure = token_layer_map(torch.rand(2, 9), tokens, "t", spans={"prefill": slice(4, 6), "response": slice(6, 9),
                                                                   "end": slice(9, 9)})
    shapes = {(shape.x0, shape.x1) for shape in figure.layout.shapes}
    assert shapes == {(3.5, 5.5), (5.5, 8.5)}  # the empty span draws nothing
    labels = [annotation.text for annotation in figure.layout.annotations]
    assert labels == ["prefill (4–5)", "response (6–8)"]


def test_random_head_control_never_shares_a_head_with_the_top_set():
    for seed in range(30):
        mass = torch.rand(2, 4, generator=torch.Generator().manual_seed(seed))
        top = top_heads(mass, 4)
        control = random_heads((2, 4), 4, exclude=top, seed=0)
        assert len(set(control)) == 4 and not set(control) & set(top), (seed, top, control)
        assert all(0 <= layer < 2 and 0 <= head < 4 for layer, head in control)
    assert random_heads((4, 4), 3, seed=0) == random_heads((4, 4), 3, seed=0)  # seeded
    # With nothing excluded it is the first k of the seeded permutation, as the control always drew.
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:3].tolist()
    assert random_heads((4, 4), 3, seed=0) == [(i // 4, i % 4) for i in order]
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        random_heads((2, 4), 5, exclude=top_heads(torch.rand(2, 4), 4))


def test_metrics_explain_every_column_and_show_in_the_report(tmp_path):
    section = Section("Ablation", ["text"], table=[["none", "0.1", "0.2", "0.3"]],
                      header=["ablated heads", "prefill 2", "prefill 5", "RAP"],
                      metrics=[("prefill n", "score after n forced tokens"), ("RAP", "rank-assisted prefilling")])
    assert unexplained_columns(section) == []
    assert unexplained_columns(Section("x", header=["model", "PFA-1 after 3 (vs da)"])) == ["PFA-1 after 3 (vs da)"]
    path = write_report(tmp_path / "r.html", "r", [section, Section("Smoke", banner="SMOKE RUN <b>")])
    text = path.read_text()
    assert "<li><b>prefill n</b>: score after n forced tokens</li>" in text
    assert "<p class='banner'>SMOKE RUN &lt;b&gt;</p>" in text
