"""An HTML report that opens offline: plotly.js is embedded once (no CDN), all model text is
HTML-escaped (generations are untrusted input), and the data behind every figure is written to a
JSON file beside it. PNG export uses kaleido when it and a Chromium are available."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go

from deepalign.analysis.figures import figure_data
from deepalign.io import atomic_write_json, atomic_write_text, check_writable_file


@dataclass
class Section:
    """A report section: a title, paragraphs, ``metrics`` (each a (name, one-line meaning) pair, shown as
    a list under the text), a table of (escaped) text, and an optional figure."""

    title: str
    text: Sequence[str] = ()
    figure: go.Figure | None = None
    table: Sequence[Sequence[object]] = ()
    header: Sequence[str] = ()
    samples: Sequence[str] = field(default_factory=list)  # model generations, shown verbatim but escaped
    metrics: Sequence[tuple[str, str]] = ()
    banner: str = ""  # a warning shown above everything else of the section (e.g. a smoke run's)


def _metric_pattern(name: str) -> re.Pattern:
    """A metric's name as a pattern over table columns: a lone ``n`` stands for a number and
    ``<…>`` for any text, so ``"prefill n"`` explains ``"prefill 5"``."""
    parts = re.split(r"(<[^<>]*>|\bn\b)", name)
    body = "".join(".+" if part.startswith("<") else r"\d+" if part == "n" else re.escape(part) for part in parts)
    return re.compile(body + "$")


def unexplained_columns(section: Section) -> list[str]:
    """The table columns of ``section`` after the first (the row labels) that none of its
    ``metrics`` explains: every number a report shows should have its one-line meaning."""
    patterns = [_metric_pattern(name) for name, _ in section.metrics]
    return [column for column in list(section.header)[1:]
            if not any(pattern.match(str(column)) for pattern in patterns)]


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(path: str | Path, title: str, sections: Sequence[Section]) -> Path:
    """Write ``path`` (HTML) and ``path.json`` (figure data); both atomically. Returns ``path``."""
    path = check_writable_file(path, what="report")
    parts = [f"<h1>{html.escape(title)}</h1>"]
    data = {}
    plotly_included = False
    for index, section in enumerate(sections):
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.banner:
            parts.append(f"<p class='banner'>{html.escape(section.banner)}</p>")
        parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in section.text]
        if section.metrics:
            parts.append("<ul class='metrics'>" + "".join(
                f"<li><b>{html.escape(name)}</b>: {html.escape(meaning)}</li>" for name, meaning in section.metrics)
                + "</ul>")
        if section.table:
            parts.append(_table(section.header, section.table))
        if section.samples:
            parts += [f"<pre class='sample'>{html.escape(sample)}</pre>" for sample in section.samples]
        if section.figure is not None:
            parts.append(section.figure.to_html(full_html=False, include_plotlyjs="inline" if not plotly_included else False,
                                                div_id=f"figure-{index}"))
            plotly_included = True
            data[f"{index}: {section.title}"] = figure_data(section.figure)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px}pre.sample{background:#f6f6f6;white-space:pre-wrap}"
             "p.banner{background:#fff3cd;border:2px solid #e0a800;padding:8px 12px;font-weight:bold}"
             "ul.metrics{font-size:92%}")
    document = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    atomic_write_text(path, document)
    atomic_write_json(path.with_name(path.name + ".json"), data)
    return path


def export_png(figure: go.Figure, path: str | Path) -> Path:
    """PNG export through kaleido (which needs a Chromium). Raises ``RuntimeError`` with what to
    install when either is missing."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise RuntimeError("PNG export needs kaleido: pip install 'kaleido>=1' (and a Chromium, e.g. Debian's "
                           "chromium package)") from None
    try:
        figure.write_image(str(path))
    except Exception as error:  # kaleido reports a missing browser in several ways
        raise RuntimeError(f"PNG export failed ({error}); kaleido needs a Chromium: install Debian's chromium") from error
    return Path(path)
