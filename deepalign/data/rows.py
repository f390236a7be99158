"""Training data rows and their files, with errors that name the file and line.

deepalign's own layout (JSON lines):

* a safety row: ``{"prompt": …, "harmful_response": …, "refusal": …}`` (DA, PRESTO);
* a chat row: ``{"prompt": …, "response": …}`` (SFT, the utility anchor, the constrained objective,
  fine-tuning attacks).

The authors' files read as they are (Qi et al., Unispac/shallow-vs-deep-alignment,
``finetuning_buckets/datasets``), as JSON lines or one JSON array:

* safety-augmentation triplets ``{"instruction", "input"?, "harmful", "refusal"}`` → safety rows;
* Alpaca-style ``{"instruction", "input"?, "output"}`` (the utility anchor) → chat rows;
* chat ``{"messages": [system?, user, assistant]}`` (the harmful-examples, backdoor and AOA
  fine-tuning-attack sets) → chat rows; their system prompt is :func:`rows_system`.

An ``input`` is appended to the ``instruction`` after a blank line, as the authors' formatter does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from deepalign.errors import FileFormatError
from deepalign.io import atomic_write_text, iter_jsonl, read_json


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


def _records(path: str | Path):
    """``(where, record)`` for each record of a JSON-lines file, or of a ``.json`` file holding one
    JSON array (``where``: ``file:line``, or ``file: item N`` in an array)."""
    if Path(path).suffix.lower() == ".json":  # one JSON document (the authors' .json files are arrays)
        records = read_json(path, what="data file")
        if not isinstance(records, list):
            raise FileFormatError(f"{path}: expected a JSON array of objects")
        return [(f"{path}: item {index}", record) for index, record in enumerate(records, start=1)]
    return [(f"{path}:{number}", record) for number, record in iter_jsonl(path, what="data file")]


def _instruction(record: dict) -> str:
    extra = record.get("input")
    return f"{record['instruction']}\n\n{extra}" if isinstance(extra, str) and extra.strip() else record["instruction"]


def _messages(record: dict, where: str) -> tuple[str | None, str, str]:
    """(system, user, assistant) of a one-exchange chat record."""
    messages = record["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in messages):
        raise FileFormatError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    by_role: dict[str, list[str]] = {}
    for message in messages:
        by_role.setdefault(message.get("role"), []).append(message["content"])
    if len(by_role.get("user", [])) != 1 or len(by_role.get("assistant", [])) != 1 or len(by_role.get("system", [])) > 1:
        raise FileFormatError(f"{where}: expected one user and one assistant message (and at most one system message)")
    return (by_role.get("system") or [None])[0], by_role["user"][0], by_role["assistant"][0]


def _row(record, kind: type[Row], where: str) -> Row:
    if not isinstance(record, dict):
        raise FileFormatError(f"{where}: expected a JSON object")
    if kind is SafetyExample and "harmful" in record and "instruction" in record:
        values = (_instruction(record), record["harmful"], record.get("refusal"))
    elif kind is UtilityExample and "messages" in record:
        values = _messages(record, where)[1:]
    elif kind is UtilityExample and "instruction" in record and "output" in record:
        values = (_instruction(record), record["output"])
    else:
        fields = _FIELDS[kind]
        missing = [f for f in fields if not isinstance(record.get(f), str) or not record[f].strip()]
        if missing:
            raise FileFormatError(f"{where}: missing or empty field(s) {', '.join(missing)} "
                                  f"(a {kind.__name__} row needs {', '.join(fields)}, or one of the authors' layouts)")
        values = tuple(record[f] for f in fields)
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise FileFormatError(f"{where}: a field of this {kind.__name__} row is missing or empty")
    return kind(*values)


def read_rows(path: str | Path, kind: type[Row]) -> list[Row]:
    """All rows of a data file as ``kind`` (:class:`SafetyExample` or :class:`UtilityExample`), in
    deepalign's layout or one of the authors' (module docstring). Blank lines are skipped; a record
    that fits no layout raises :class:`~deepalign.errors.FileFormatError` naming the file and line."""
    rows = [_row(record, kind, where) for where, record in _records(path)]
    if not rows:
        raise FileFormatError(f"{path}: the file has no rows")
    return rows


def rows_system(path: str | Path) -> str | None:
    """The system prompt of a chat file's ``messages`` records (``None`` when they carry none).
    Records with different system prompts are refused: a recipe trains with one."""
    systems = {_messages(record, where)[0] for where, record in _records(path)
               if isinstance(record, dict) and "messages" in record}
    if len(systems) > 1:
        raise FileFormatError(f"{path}: its records carry {len(systems)} different system prompts; a recipe trains "
                              "with one (give it with --system)")
    return next(iter(systems), None)


def write_rows(path: str | Path, rows: list[SafetyExample] | list[UtilityExample]) -> Path:
    """Write rows as JSON lines, atomically."""
    return atomic_write_text(path, "".join(json.dumps({f: getattr(row, f) for f in _FIELDS[type(row)]}) + "\n"
                                           for row in rows))
