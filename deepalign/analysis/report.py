"""An HTML report that opens offline: plotly.js is embedded once (no CDN), all model text is
HTML-escaped (generations are untrusted input), and the data behind every figure is written to a
JSON file beside it. PNG export uses kaleido when it and a Chromium are available."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go

from deepalign.analysis.figures import figure_data
from deepalign.io import atomic_write_json, atomic_write_text, check_writable_file


@dataclass
class Section:
    """A report section: a title, paragraphs and a table of (escaped) text, and an optional figure."""

    title: str
    text: Sequence[str] = ()
    figure: go.Figure | None = None
    table: Sequence[Sequence[object]] = ()
    header: Sequence[str] = ()
    samples: Sequence[str] = field(default_factory=list)  # model generations, shown verbatim but escaped


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
        parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in section.text]
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
             "td,th{border:1px solid #ccc;padding:3px 8px}pre.sample{background:#f6f6f6;white-space:pre-wrap}")
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
