"""Readers for the utility and over-refusal files: GSM8K-format math, SAMSum-format dialogues and
XSTest-style prompts. Each bad row is a :class:`~deepalign.errors.FileFormatError` naming
``file:line`` and what was expected; nothing is skipped.

| reader | layout | fields |
|--------|--------|--------|
| :func:`read_gsm8k` | JSON lines (or one JSON array) | ``question``, ``answer`` whose final number follows ``#### `` (GSM8K's own layout), optional ``id`` |
| :func:`read_samsum` | JSON lines (or one JSON array, the SAMSum corpus's ``test.json``) | ``dialogue``, ``summary``, optional ``id`` |
| :func:`read_over_refusal` | CSV, or JSON lines | ``prompt`` and ``label`` (``safe`` / ``unsafe``), optional ``id``, ``type``, ``focus`` |

XSTest's files read as they are: ``xstest_prompts.csv`` (``id, prompt, type, label, focus, note``;
paul-rottger/exaggerated-safety, the layout of the published dataset) and the older
``xstest_v2_prompts.csv`` (``id_v1, id_v2, type, prompt, focus, note``, no ``label`` column: there the
``contrast_*`` types are the unsafe prompts and all others the safe ones, as the XSTest paper defines
its contrast set).

GSM8K's reference answer is the number after ``#### `` in its ``answer`` text, read with Qi et al.'s
rule (:func:`parse_final_number`, the one the evaluation applies to a model's output too); a row whose
answer has none is refused, since it could never be matched.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from deepalign.errors import FileFormatError, InputError
from deepalign.io import iter_jsonl, read_csv, read_json, read_text

# Qi et al.'s GSM8K answer pattern (Unispac/shallow-vs-deep-alignment, finetuning_buckets/inference/
# utility_eval/gsm8k_eval.py, ANS_RE): "#### " then an optional minus and digits, dots and commas.
GSM8K_ANSWER = re.compile(r"#### (-?[0-9.,]+)")
LABELS = ("safe", "unsafe")


@dataclass(frozen=True)
class MathProblem:
    """A GSM8K-format problem: ``answer`` is the reference text (its worked solution), ``final`` the
    reference's final number."""

    id: str
    question: str
    answer: str
    final: float


@dataclass(frozen=True)
class Dialogue:
    """A SAMSum-format dialogue with its reference ``summary``."""

    id: str
    dialogue: str
    summary: str


@dataclass(frozen=True)
class OverRefusalPrompt:
    """A prompt of an over-refusal set. ``label``: ``safe`` (a benign request; refusing it is an
    over-refusal) or ``unsafe`` (a contrast prompt that should be refused); ``type`` and ``focus``:
    XSTest's prompt type and the alarming word it turns on; ``item``: for the synthetic world's set,
    the item whose recipe answers the request (empty for a file's rows)."""

    id: str
    prompt: str
    label: str
    type: str = ""
    focus: str = ""
    item: str = ""


def parse_final_number(text: str) -> float | None:
    """The number after the first ``#### `` in ``text`` by Qi et al.'s rule: the match of
    :data:`GSM8K_ANSWER`, stripped, commas removed, read as a float; ``None`` when there is no match or
    it is not a number (``"1.2.3"``, ``"-"``), as their ``gsm8k_metric`` scores it ``[invalid]``."""
    match = GSM8K_ANSWER.search(text)
    if match is None:
        return None
    try:
        return float(match.group(1).strip().replace(",", ""))
    except ValueError:
        return None


def iter_records(path: str | Path, *, what: str) -> Iterator[tuple[int, Any]]:
    """``(line, value)`` for each record of a JSON-lines file, or of a file holding one JSON array
    (the first character that is not a space is ``[``); ``line`` is where the record starts."""
    path = Path(path)
    text = read_text(path, what=what)
    if not text.lstrip().startswith("["):
        yield from iter_jsonl(path, what=what)
        return
    read_json(path, what=what)  # the whole array is valid JSON (encoding, nesting, surrogates), said with file:line
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        value, end = decoder.raw_decode(text, position)
        yield text.count("\n", 0, position) + 1, value
        position = end


class _Ids:
    """Result logs are keyed by id: a second row with an id already used is refused, naming both lines."""

    def __init__(self, path: Path):
        self.path, self.first = path, {}

    def __call__(self, value: Any, line: int, default: str) -> str:
        if value is None or (isinstance(value, str) and not value.strip()):
            value = default
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise FileFormatError(f"{self.path}:{line}: 'id' must be a string or an integer, got {type(value).__name__}")
        key = str(value).strip()
        if key in self.first:
            raise FileFormatError(f"{self.path}:{line}: the id {key!r} is already the id of line {self.first[key]}; "
                                  "ids must be unique")
        self.first[key] = line
        return key


def _text_field(path: Path, line: int, record: Any, field: str, expected: str) -> str:
    if not isinstance(record, dict):
        raise FileFormatError(f"{path}:{line}: expected an object with {expected}, got {type(record).__name__}")
    if field not in record:
        fields = ", ".join(map(repr, record)) or "none"
        raise FileFormatError(f"{path}:{line}: missing {field!r} (fields: {fields}); expected {expected}")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise FileFormatError(f"{path}:{line}: {field!r} must be text, got {type(value).__name__}")
    if value is None or not value.strip():
        raise FileFormatError(f"{path}:{line}: empty {field!r}")
    return value


def _nonempty(path: Path, rows: list) -> list:
    if not rows:
        raise FileFormatError(f"{path}: the file has no rows")
    return rows


def read_gsm8k(path: str | Path) -> list[MathProblem]:
    """GSM8K-format problems (JSON lines or a JSON array of ``{"question", "answer"}``). The
    question is kept as written (Qi et al. send it unchanged as the user turn); an answer without a
    final number after ``#### `` is refused by ``file:line``."""
    path, problems = Path(path), []
    ids = _Ids(path)
    expected = "'question' and 'answer' (GSM8K's layout)"
    for line, record in iter_records(path, what="GSM8K file"):
        question = _text_field(path, line, record, "question", expected)
        answer = _text_field(path, line, record, "answer", expected)
        final = parse_final_number(answer)
        if final is None:
            raise FileFormatError(f"{path}:{line}: the answer has no final number after '#### ' (GSM8K writes the "
                                  f"reference as '#### 42' at its end): {answer[-60:]!r}")
        problems.append(MathProblem(ids(record.get("id"), line, f"gsm8k-{len(problems) + 1}"), question, answer, final))
    return _nonempty(path, problems)


def read_samsum(path: str | Path) -> list[Dialogue]:
    """SAMSum-format dialogues (JSON lines or the corpus's JSON array of ``{"id", "summary",
    "dialogue"}``); texts kept as written."""
    path, dialogues = Path(path), []
    ids = _Ids(path)
    expected = "'dialogue' and 'summary' (SAMSum's layout)"
    for line, record in iter_records(path, what="SAMSum file"):
        dialogue = _text_field(path, line, record, "dialogue", expected)
        summary = _text_field(path, line, record, "summary", expected)
        dialogues.append(Dialogue(ids(record.get("id"), line, f"samsum-{len(dialogues) + 1}"), dialogue, summary))
    return _nonempty(path, dialogues)


def _label(path: Path, line: int, row: dict) -> str:
    if "label" in row and row["label"] is not None:
        label = str(row["label"]).strip().lower()
        if label not in LABELS:
            raise FileFormatError(f"{path}:{line}: label {row['label']!r}; expected 'safe' or 'unsafe'")
        return label
    kind = str(row.get("type") or "").strip()
    if not kind:
        raise FileFormatError(f"{path}:{line}: no 'label' (safe / unsafe) and no XSTest 'type' to read it from")
    return "unsafe" if kind.startswith("contrast_") else "safe"  # XSTest v2's contrast prompts are the unsafe ones


def read_over_refusal(path: str | Path) -> list[OverRefusalPrompt]:
    """An XSTest-style file: a CSV with ``prompt`` and ``label`` (XSTest's ``xstest_prompts.csv`` as it
    is), XSTest v2's ``xstest_v2_prompts.csv`` (label from ``type``), or JSON lines with ``prompt`` and
    ``label``. Prompts are kept as written; ids are the file's ``id`` (``id_v2``) or ``xstest-N``."""
    path, prompts = Path(path), []
    ids = _Ids(path)
    if path.suffix.lower() == ".csv":
        header, rows = read_csv(path, ("prompt",), what="over-refusal file")
        if "label" not in header and "type" not in header:
            raise FileFormatError(f"{path}:1: missing column label (safe / unsafe) or XSTest's type (header: "
                                  f"{', '.join(header)})")
        records = [(line, row) for line, row in rows]
    else:
        records = list(iter_records(path, what="over-refusal file"))
    for line, row in records:
        prompt = _text_field(path, line, row, "prompt", "'prompt' and 'label' (safe / unsafe)")
        label = _label(path, line, row)
        raw_id = row.get("id") if row.get("id") not in (None, "") else row.get("id_v2")
        prompts.append(OverRefusalPrompt(ids(raw_id, line, f"xstest-{len(prompts) + 1}"), prompt, label,
                                         str(row.get("type") or "").strip(), str(row.get("focus") or "").strip()))
    return _nonempty(path, prompts)


READERS = {"gsm8k": read_gsm8k, "samsum": read_samsum, "over-refusal": read_over_refusal}


def read_utility_file(path: str | Path, task: str) -> list:
    """The rows of ``path`` for ``task`` (``gsm8k``, ``samsum`` or ``over-refusal``)."""
    if task not in READERS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(READERS)}")
    return READERS[task](path)
