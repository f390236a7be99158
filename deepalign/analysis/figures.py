"""Plotly figures for the analyses. Every function returns a ``plotly.graph_objects.Figure`` and
never shows it; :func:`figure_data` gives the data behind a figure as plain JSON-able lists.

Text in a figure that comes from a caller (token strings, model names, titles) goes through
:func:`plain_label`, so that plotly shows it literally and reads no markup in model text."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots


_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "$": "&#36;"}
_ESCAPED = re.compile(r"[&<>$]")
_UNESCAPED = {v: k for k, v in _ESCAPES.items()}
_ENTITY = re.compile("|".join(re.escape(entity) for entity in _UNESCAPED))


def plain_label(text: object) -> str:
    """``text`` (e.g. a token string) for a plotly title, tick label, trace name or hover text,
    shown literally.

    plotly.js reads a mini-HTML in all of these: tags (``<b>``, ``<i>``, ``<br>``, ``<sup>``,
    ``<a href=…>``, ``<span style=…>``, …), entities (``&amp;``, ``&#60;``, …) and ``$…$`` as LaTeX
    where MathJax is loaded. ``& < > $`` become the entities ``&amp; &lt; &gt; &#36;``: plotly.js
    splits tags *before* it decodes entities (since 1.41, plotly.js PR #2932; plotly ≥ 5.20 ships
    2.x and later) and puts each decoded part into a text node, and it looks for LaTeX in the raw
    string, so the label shows exactly the original characters and is never markup. (Look-alike
    characters such as ‹ › would show other text.) :func:`figure_data` decodes them back."""
    return _ESCAPED.sub(lambda match: _ESCAPES[match.group()], str(text))


def _unlabel(value):
    """The inverse of :func:`plain_label` on a string (other values pass unchanged)."""
    return _ENTITY.sub(lambda match: _UNESCAPED[match.group()], value) if isinstance(value, str) else value


def _grid(matrix: torch.Tensor) -> list[list[float]]:
    return matrix.detach().cpu().double().tolist()


def head_heatmap(matrix: torch.Tensor, title: str, *, colorbar: str = "mass") -> go.Figure:
    """Layer × head heatmap of a ``[layers, heads]`` statistic (layer 0 at the bottom)."""
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be [layers, heads], got {tuple(matrix.shape)}")
    figure = go.Figure(go.Heatmap(z=_grid(matrix), x=list(range(matrix.shape[1])), y=list(range(matrix.shape[0])),
                                  colorscale="Viridis", colorbar={"title": plain_label(colorbar)}))
    figure.update_layout(title=plain_label(title), xaxis_title="head", yaxis_title="layer")
    return figure


def comparison_heatmaps(first: torch.Tensor, second: torch.Tensor, names: tuple[str, str]) -> go.Figure:
    """Two ``[layers, heads]`` maps side by side and their difference (second − first)."""
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {tuple(first.shape)} and {tuple(second.shape)}")
    titles = tuple(plain_label(t) for t in (names[0], names[1], f"{names[1]} − {names[0]}"))
    figure = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.08)
    low, high = float(min(first.min(), second.min())), float(max(first.max(), second.max()))
    for column, matrix in ((1, first), (2, second)):
        figure.add_trace(go.Heatmap(z=_grid(matrix), zmin=low, zmax=high, colorscale="Viridis",
                                    showscale=column == 2), row=1, col=column)
    difference = second - first
    bound = float(difference.abs().max()) or 1.0
    figure.add_trace(go.Heatmap(z=_grid(difference), zmin=-bound, zmax=bound, colorscale="RdBu_r",
                                colorbar={"x": 1.08}), row=1, col=3)
    for column in (1, 2, 3):
        figure.update_xaxes(title_text="head", row=1, col=column)
    figure.update_yaxes(title_text="layer", row=1, col=1)
    return figure


def position_lines(series: Mapping[str, torch.Tensor], title: str, *, yaxis: str, log_y: bool = False) -> go.Figure:
    """Per-position curves with a ±1 std band: each value is ``[examples, positions]`` (NaN where
    an example is shorter)."""
    figure = go.Figure()
    for name, values in series.items():
        values = values.double()
        mean = torch.nanmean(values, dim=0)
        std = torch.sqrt(torch.nanmean((values - mean) ** 2, dim=0))
        x = list(range(values.shape[1]))
        figure.add_trace(go.Scatter(x=x + x[::-1], y=(mean + std).tolist() + (mean - std).flip(0).tolist(),
                                    fill="toself", line={"width": 0}, opacity=0.2, showlegend=False,
                                    name=plain_label(f"{name} ±1 std")))
        figure.add_trace(go.Scatter(x=x, y=mean.tolist(), mode="lines", name=plain_label(name)))
    figure.update_layout(title=plain_label(title), xaxis_title="response position", yaxis_title=plain_label(yaxis))
    if log_y:
        figure.update_yaxes(type="log")
    return figure


def token_layer_map(matrix: torch.Tensor, tokens: Sequence[str], title: str) -> go.Figure:
    """Token × layer map (``[layers, tokens]``), e.g. the attention each token receives per layer."""
    if matrix.dim() != 2 or matrix.shape[1] != len(tokens):
        raise ValueError(f"matrix must be [layers, {len(tokens)} tokens], got {tuple(matrix.shape)}")
    labels = [plain_label(f"{i}:{t}") for i, t in enumerate(tokens)]
    figure = go.Figure(go.Heatmap(z=_grid(matrix), x=labels, y=list(range(matrix.shape[0])), colorscale="Magma"))
    figure.update_layout(title=plain_label(title), xaxis_title="token", yaxis_title="layer")
    return figure


def figure_data(figure: go.Figure) -> dict:
    """The data behind a figure: per trace its name, type and x / y / z values (JSON-able), the
    labels as their original text (:func:`plain_label` undone)."""
    traces = []
    for trace in figure.data:
        entry = {"type": trace.type, "name": _unlabel(trace.name)}
        for axis in ("x", "y", "z"):
            value = getattr(trace, axis, None)
            if value is not None:
                entry[axis] = [list(row) if isinstance(row, (list, tuple)) else _unlabel(row) for row in value]
        traces.append(entry)
    return {"title": _unlabel(figure.layout.title.text), "traces": traces}
