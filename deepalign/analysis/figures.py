"""Plotly figures for the analyses. Every function returns a ``plotly.graph_objects.Figure`` and
never shows it; :func:`figure_data` gives the data behind a figure as plain JSON-able lists.

Text in a figure that comes from a caller (token strings, model names, titles) goes through
:func:`plain_label`, so that plotly shows it literally and reads no markup in model text."""

from __future__ import annotations

import math
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


# Model colours (Okabe–Ito, distinguishable with the common colour-vision deficiencies), then a tint
# of each for a model's second kind of line; kinds of line also differ in dash.
MODEL_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
DASHES = ("solid", "dot", "dash", "dashdot", "longdash", "longdashdot")


def _tint(colour: str, amount: float) -> str:
    """``colour`` (#rrggbb) mixed with white by ``amount`` in [0, 1)."""
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in rgb)


def _rgba(colour: str, alpha: float) -> str:
    return f"rgba({int(colour[1:3], 16)}, {int(colour[3:5], 16)}, {int(colour[5:7], 16)}, {alpha})"


def line_styles(names: Sequence[str]) -> dict[str, dict[str, str]]:
    """A distinct ``{"color", "dash", "width", "group"}`` per line name. A name ``"model: kind"`` takes its
    model's colour (one per model, in order of appearance) — darker for the model's first kind, a
    lighter tint for later kinds — and its kind's dash (one per kind), so that every line differs
    from every other in colour and the model and the kind can each be read at a glance. Earlier
    models' lines are wider, so that lines lying on top of each other (e.g. every model's harmful
    token at rank 1) still show each colour."""
    models: dict[str, int] = {}
    kinds: dict[str, int] = {}
    styles = {}
    for name in names:
        model, _, kind = str(name).partition(": ")
        m = models.setdefault(model, len(models))
        k = kinds.setdefault(kind, len(kinds))
        base = MODEL_COLOURS[m % len(MODEL_COLOURS)]
        cycle = m // len(MODEL_COLOURS)  # past eight models, tints tell the cycles apart
        styles[name] = {"color": _tint(base, min(0.8, 0.45 * k + 0.25 * cycle)) if (k or cycle) else base,
                        "dash": DASHES[k % len(DASHES)], "group": model, "index": m}
    for style in styles.values():  # earlier models drawn wider, so lines that coincide stay visible
        style["width"] = 2.0 + 1.0 * (len(models) - 1 - style.pop("index"))
    return styles


def _integer_axis(length: int) -> dict:
    """Axis settings for integer positions 0 … length − 1: ticks on integers only."""
    return {"tickmode": "linear", "tick0": 0, "dtick": max(1, -(-length // 12)), "tickformat": "d"}


BANDS = ("std", "quantile")


def position_lines(series: Mapping[str, torch.Tensor], title: str, *, yaxis: str, log_y: bool = False,
                   band: str = "std", low: float | None = None, high: float | None = None,
                   quantiles: tuple[float, float] = (0.25, 0.75)) -> go.Figure:
    """Per-position curves, each value ``[examples, positions]`` (NaN where an example is shorter).

    ``band="std"``: the mean with a mean ± 1 std band; ``band="quantile"``: the median with the
    ``quantiles`` band (interquartile by default), which suits skewed quantities such as ranks.
    Bands are clipped to the quantity's range ``[low, high]`` (e.g. ``low=0`` for KL, ``low=1`` for
    1-based ranks), so no band shows values the quantity cannot take. Each line has its own colour
    and dash (:func:`line_styles`); a line's band shares its colour and legend group."""
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, got {band!r}")
    figure = go.Figure()
    styles = line_styles(list(series))
    width = 0
    for name, values in series.items():
        values = values.double()
        width = max(width, values.shape[1])
        if band == "std":
            centre = torch.nanmean(values, dim=0)
            spread = torch.sqrt(torch.nanmean((values - centre) ** 2, dim=0))
            lower, upper, label = centre - spread, centre + spread, "±1 std"
        else:
            centre = torch.nanquantile(values, 0.5, dim=0)
            lower, upper = (torch.nanquantile(values, q, dim=0) for q in quantiles)
            label = f"{quantiles[0]:.0%}–{quantiles[1]:.0%} quantiles"
        if low is not None or high is not None:
            lower, upper = lower.clamp(min=low, max=high), upper.clamp(min=low, max=high)
        x = list(range(values.shape[1]))
        style = styles[name]
        figure.add_trace(go.Scatter(x=x + x[::-1], y=upper.tolist() + lower.flip(0).tolist(), fill="toself",
                                    fillcolor=_rgba(style["color"], 0.15), line={"width": 0}, hoverinfo="skip",
                                    showlegend=False, legendgroup=plain_label(style["group"]),
                                    name=plain_label(f"{name} {label}")))
        figure.add_trace(go.Scatter(x=x, y=centre.tolist(), mode="lines", name=plain_label(name),
                                    legendgroup=plain_label(style["group"]),
                                    line={"color": style["color"], "dash": style["dash"], "width": style["width"]}))
    centre_name = "mean" if band == "std" else "median"
    band_name = "±1 std" if band == "std" else f"{quantiles[0]:.0%}–{quantiles[1]:.0%} quantiles"
    figure.update_layout(title=plain_label(f"{title} ({centre_name}, band: {band_name})"),
                         xaxis_title="response position", yaxis_title=plain_label(yaxis), xaxis=_integer_axis(width))
    if log_y:
        figure.update_yaxes(type="log", **_log_ticks(series.values(), low))
    return figure


def _log_ticks(values, low: float | None) -> dict:
    """Ticks 1, 2, 5, 10, 20, 50, … up to the largest value, and, with ``low``, the axis starting at
    it (so a log axis shows no range below what the quantity can take)."""
    finite = [float(torch.nan_to_num(v.double(), nan=0.0).max()) for v in values]
    top = max([1.0, *finite])
    ticks, decade = [], 1
    while decade <= top * 10:
        ticks += [decade * m for m in (1, 2, 5) if low is None or decade * m >= low]
        decade *= 10
    settings = {"tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}
    if low is not None and low > 0:
        settings["range"] = [math.log10(low) - 0.04, math.log10(top) + 0.08]
    return settings


def _heat_axes(figure: go.Figure, layers: int, heads: int, *, layer_title: bool = True, **where) -> None:
    figure.update_xaxes(title_text="head", **_integer_axis(heads), **where)
    figure.update_yaxes(title_text="layer" if layer_title else None, **_integer_axis(layers), **where)


def head_heatmap(matrix: torch.Tensor, title: str, *, colorbar: str = "mass", zmin: float | None = None,
                 zmax: float | None = None, marks: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> go.Figure:
    """Layer × head heatmap of a ``[layers, heads]`` statistic (layer 0 at the bottom), with a
    titled colour bar, integer ticks and, optionally, ``marks``: named sets of (layer, head) cells
    drawn as markers (e.g. the heads an ablation removed)."""
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be [layers, heads], got {tuple(matrix.shape)}")
    figure = go.Figure(go.Heatmap(z=_grid(matrix), x=list(range(matrix.shape[1])), y=list(range(matrix.shape[0])),
                                  zmin=zmin, zmax=zmax, colorscale="Viridis",
                                  colorbar={"title": {"text": plain_label(colorbar), "side": "right"}}))
    for (name, cells), symbol in zip((marks or {}).items(), ("x", "circle", "square", "diamond")):
        # White with a black edge: visible on every cell of the colour scale and in the legend.
        figure.add_trace(go.Scatter(x=[h for _, h in cells], y=[l for l, _ in cells], mode="markers",
                                    name=plain_label(name), marker={"symbol": symbol, "size": 13, "color": "white",
                                                                    "line": {"width": 1.5, "color": "black"}}))
    figure.update_layout(title=plain_label(title), legend={"orientation": "h", "y": -0.2})
    _heat_axes(figure, *matrix.shape)
    return figure


def comparison_heatmaps(first: torch.Tensor, second: torch.Tensor, names: tuple[str, str], *,
                        colorbar: str = "mass") -> go.Figure:
    """Two ``[layers, heads]`` maps side by side on one colour scale (shared ``zmin``/``zmax``, one
    colour bar titled ``colorbar``) and their difference (second − first) on a symmetric diverging
    scale with its own titled bar."""
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {tuple(first.shape)} and {tuple(second.shape)}")
    titles = tuple(plain_label(t) for t in (names[0], names[1], f"{names[1]} − {names[0]}"))
    figure = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.13)
    low, high = float(min(first.min(), second.min())), float(max(first.max(), second.max()))
    middle_right = figure.layout.xaxis2.domain[1]
    for column, matrix in ((1, first), (2, second)):
        figure.add_trace(go.Heatmap(z=_grid(matrix), zmin=low, zmax=high, colorscale="Viridis",
                                    showscale=column == 2, name=plain_label(names[column - 1]),
                                    colorbar={"title": {"text": plain_label(colorbar), "side": "right"},
                                              "x": middle_right + 0.01, "xanchor": "left", "thickness": 14}),
                         row=1, col=column)
    difference = second - first
    bound = float(difference.abs().max()) or 1.0
    figure.add_trace(go.Heatmap(z=_grid(difference), zmin=-bound, zmax=bound, colorscale="RdBu_r",
                                name=plain_label(f"{names[1]} − {names[0]}"),
                                colorbar={"title": {"text": plain_label(f"difference ({names[1]} − {names[0]})"),
                                                    "side": "right"}, "x": 1.01, "xanchor": "left",
                                          "thickness": 14}),
                     row=1, col=3)
    for column in (1, 2, 3):  # the layer axis titled once, clear of the colour bars
        _heat_axes(figure, *first.shape, layer_title=column == 1, row=1, col=column)
    return figure


SPAN_COLOURS = {"prefill": "#D55E00", "response": "#009E73"}


def token_layer_map(matrix: torch.Tensor, tokens: Sequence[str], title: str, *,
                    spans: Mapping[str, slice] | None = None, zmin: float | None = None, zmax: float | None = None,
                    colorbar: str = "attention received") -> go.Figure:
    """Token × layer map (``[layers, tokens]``), e.g. the attention each token receives per layer,
    with a titled colour bar, integer layer ticks, and each of ``spans`` (e.g. ``{"prefill":
    slice(…), "response": slice(…)}``, token positions) outlined and labelled above the map. Give
    ``zmin``/``zmax`` to put maps that are compared on one colour scale."""
    if matrix.dim() != 2 or matrix.shape[1] != len(tokens):
        raise ValueError(f"matrix must be [layers, {len(tokens)} tokens], got {tuple(matrix.shape)}")
    labels = [plain_label(f"{i}:{t}") for i, t in enumerate(tokens)]
    figure = go.Figure(go.Heatmap(z=_grid(matrix), x=labels, y=list(range(matrix.shape[0])), colorscale="Magma",
                                  zmin=zmin, zmax=zmax,
                                  colorbar={"title": {"text": plain_label(colorbar), "side": "right"}}))
    for name, where in (spans or {}).items():
        start, stop, _ = where.indices(len(tokens))
        if start >= stop:
            continue
        colour = SPAN_COLOURS.get(name, "#56B4E9")
        # On a category axis token i sits at i: the span covers [start − ½, stop − ½].
        figure.add_shape(type="rect", xref="x", yref="paper", x0=start - 0.5, x1=stop - 0.5, y0=0, y1=1.0,
                         line={"color": colour, "width": 3}, fillcolor=_rgba(colour, 0.12), layer="above")
        figure.add_annotation(x=(start + stop - 1) / 2, y=1.0, xref="x", yref="paper", yanchor="bottom",
                              text=plain_label(f"{name} ({start}–{stop - 1})"), showarrow=False,
                              font={"color": colour, "size": 13})
    figure.update_layout(title={"text": plain_label(title), "y": 0.97}, xaxis_title="token",
                         yaxis_title="layer", yaxis=_integer_axis(matrix.shape[0]), margin={"t": 90})
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
