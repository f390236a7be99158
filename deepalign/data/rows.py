"""Training data rows and their files (JSON lines), with errors that name the file and line.

A safety row: ``{"prompt": …, "harmful_response": …, "refusal": …}`` (DA, PRESTO).
A chat row: ``{"prompt": …, "response": …}`` (SFT, the utility anchor, the constrained objective,
fine-tuning attacks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from deepalign.errors import FileFormatError
from deepalign.io import atomic_write_text, iter_jsonl


@dataclass(frozen=True)
class SafetyExample:
    """A harmful prompt, a harmful response (the source of DA's prefills) and a refusal."""

    prompt: str
    harmful_response: str
    refusal: str


@dataclass(frozen=True)
class UtilityExample:
    """A chat row: a prompt and the response to train on."""

    prompt: str
    response: str


Row = TypeVar("Row", SafetyExample, UtilityExample)
_FIELDS = {SafetyExample: ("prompt", "harmful_response", "refusal"), UtilityExample: ("prompt", "response")}


def read_rows(path: str | Path, kind: type[Row]) -> list[Row]:
    """All rows of a JSON-lines file as ``kind`` (:class:`SafetyExample` or :class:`UtilityExample`).
    Blank lines are skipped; anything else that is not a JSON object with non-empty string fields
    of that kind raises :class:`~deepalign.errors.FileFormatError` naming the file and line."""
    fields = _FIELDS[kind]
    rows = []
    for number, record in iter_jsonl(path, what="data file"):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise FileFormatError(f"{where}: expected a JSON object with fields {', '.join(fields)}")
        missing = [f for f in fields if not isinstance(record.get(f), str) or not record[f].strip()]
        if missing:
            raise FileFormatError(f"{where}: missing or empty field(s) {', '.join(missing)} "
                                  f"(a {kind.__name__} row needs {', '.join(fields)})")
        rows.append(kind(*(record[f] for f in fields)))
    if not rows:
        raise FileFormatError(f"{path}: the file has no rows")
    return rows


def write_rows(path: str | Path, rows: list[SafetyExample] | list[UtilityExample]) -> Path:
    """Write rows as JSON lines, atomically."""
    return atomic_write_text(path, "".join(json.dumps({f: getattr(row, f) for f in _FIELDS[type(row)]}) + "\n"
                                           for row in rows))
