"""Training data rows and their files (JSON lines), with errors that name the file and line.

A safety row: ``{"prompt": …, "harmful_response": …, "refusal": …}`` (DA, PRESTO).
A chat row: ``{"prompt": …, "response": …}`` (SFT, the utility anchor, the constrained objective,
fine-tuning attacks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TypeVar


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


class DataFileError(ValueError):
    """A data file row that a recipe cannot use; the message starts with ``file:line``."""


def read_rows(path: str | Path, kind: type[Row]) -> list[Row]:
    """All rows of a JSON-lines file as ``kind`` (:class:`SafetyExample` or :class:`UtilityExample`).
    Blank lines are skipped; anything else that is not a JSON object with non-empty string fields
    of that kind raises :class:`DataFileError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such data file")
    rows = list(_parse(path, kind))
    if not rows:
        raise DataFileError(f"{path}: the file has no rows")
    return rows


def _parse(path: Path, kind: type[Row]) -> Iterator[Row]:
    fields = _FIELDS[kind]
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFileError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataFileError(f"{where}: expected a JSON object with fields {', '.join(fields)}")
            missing = [f for f in fields if not isinstance(record.get(f), str) or not record[f].strip()]
            if missing:
                raise DataFileError(f"{where}: missing or empty field(s) {', '.join(missing)} "
                                    f"(a {kind.__name__} row needs {', '.join(fields)})")
            yield kind(*(record[f] for f in fields))


def write_rows(path: str | Path, rows: list[SafetyExample] | list[UtilityExample]) -> Path:
    """Write rows as JSON lines (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({f: getattr(row, f) for f in _FIELDS[type(row)]}) + "\n")
    tmp.replace(path)
    return path
