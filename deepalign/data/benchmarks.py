"""Readers for harmful-prompt benchmarks, from local files in their published layouts.

Every reader returns :class:`AttackTarget` rows (an id, the prompt, a harmful target response when
the benchmark has one, and a category) and reports a malformed row as ``file:line``.

| format          | file        | fields used                                                       |
|-----------------|-------------|-------------------------------------------------------------------|
| ``strongreject``| CSV         | ``forbidden_prompt``, ``category`` (``source`` is kept in the id)  |
| ``harmbench``   | CSV         | ``Behavior``, ``SemanticCategory``, ``BehaviorID``, ``ContextString`` |
| ``advbench``    | CSV         | ``goal``, ``target``                                              |
| ``jailbreakbench`` | CSV      | ``Goal``, ``Target``, ``Category``, ``Behavior``                  |
| ``hex-phi``     | JSON lines  | an object with ``instruction`` (or ``prompt``), optional ``category`` |
| ``harmful-hex-phi`` | JSON lines | a list of messages: the user turn is the prompt, the assistant turn the harmful response |
| ``do-not-answer`` | JSON lines | ``question``, ``risk_area`` / ``types_of_harm``, ``id``          |
| ``lines``       | text        | one prompt per line (HarmBench-style plain lists)                  |

``read_benchmark(path)`` guesses the format from the extension and the CSV header when it is not
given.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class AttackTarget:
    """A harmful prompt to attack: its id, text, a harmful response (the source of prefills) and
    a category for per-category tables."""

    id: str
    prompt: str
    harmful_response: str = ""
    category: str = ""


class BenchmarkFileError(ValueError):
    """A benchmark file that cannot be read; the message starts with ``file:line``."""


def _csv_rows(path: Path, required: tuple[str, ...]):
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise BenchmarkFileError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
        for row in reader:
            line = reader.line_num
            empty = [c for c in required if not (row.get(c) or "").strip()]
            if empty or None in row:
                problem = f"empty {', '.join(empty)}" if empty else "more fields than the header"
                raise BenchmarkFileError(f"{path}:{line}: {problem}")
            yield line, row


def _json_rows(path: Path):
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as error:
                raise BenchmarkFileError(f"{path}:{line}: not valid JSON ({error.msg})") from None


def read_strongreject(path: Path) -> list[AttackTarget]:
    return [AttackTarget(f"strongreject-{line - 1}", row["forbidden_prompt"].strip(), "", row["category"].strip())
            for line, row in _csv_rows(path, ("category", "source", "forbidden_prompt"))]


def read_harmbench(path: Path) -> list[AttackTarget]:
    targets = []
    for line, row in _csv_rows(path, ("Behavior", "BehaviorID")):
        prompt = row["Behavior"].strip()
        context = (row.get("ContextString") or "").strip()
        if context:
            prompt = f"{context}\n\n---\n\n{prompt}"
        targets.append(AttackTarget(row["BehaviorID"].strip(), prompt, "", (row.get("SemanticCategory") or "").strip()))
    return targets


def read_advbench(path: Path) -> list[AttackTarget]:
    return [AttackTarget(f"advbench-{line - 1}", row["goal"].strip(), row["target"].strip(), "advbench")
            for line, row in _csv_rows(path, ("goal", "target"))]


def read_jailbreakbench(path: Path) -> list[AttackTarget]:
    return [AttackTarget(f"jbb-{(row.get('Behavior') or str(line - 1)).strip()}", row["Goal"].strip(),
                         row["Target"].strip(), row["Category"].strip())
            for line, row in _csv_rows(path, ("Goal", "Target", "Category"))]


def read_hex_phi(path: Path) -> list[AttackTarget]:
    targets = []
    for line, record in _json_rows(path):
        if not isinstance(record, dict):
            raise BenchmarkFileError(f"{path}:{line}: expected an object with 'instruction'")
        prompt = record.get("instruction") or record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BenchmarkFileError(f"{path}:{line}: missing 'instruction'")
        targets.append(AttackTarget(str(record.get("id", f"hex-phi-{line}")), prompt.strip(), "",
                                    str(record.get("category", ""))))
    return targets


def read_harmful_hex_phi(path: Path) -> list[AttackTarget]:
    targets = []
    for line, record in _json_rows(path):
        messages = record.get("messages") if isinstance(record, dict) else record
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BenchmarkFileError(f"{path}:{line}: expected a list of {{'role', 'content'}} messages")
        user = [m.get("content") for m in messages if m.get("role") == "user"]
        assistant = [m.get("content") for m in messages if m.get("role") == "assistant"]
        if not user or not isinstance(user[0], str) or not assistant or not isinstance(assistant[0], str):
            raise BenchmarkFileError(f"{path}:{line}: needs a user and an assistant message with text content")
        targets.append(AttackTarget(f"harmful-hex-phi-{line}", user[0].strip(), assistant[0], "harmful-hex-phi"))
    return targets


def read_do_not_answer(path: Path) -> list[AttackTarget]:
    targets = []
    for line, record in _json_rows(path):
        question = record.get("question") if isinstance(record, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise BenchmarkFileError(f"{path}:{line}: missing 'question'")
        category = record.get("risk_area") or record.get("types_of_harm") or ""
        targets.append(AttackTarget(f"dna-{record.get('id', line)}", question.strip(), "", str(category)))
    return targets


def read_lines(path: Path) -> list[AttackTarget]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [AttackTarget(f"{path.stem}-{number}", text.strip()) for number, text in enumerate(lines, start=1)
            if text.strip()]


READERS: dict[str, Callable[[Path], list[AttackTarget]]] = {
    "strongreject": read_strongreject, "harmbench": read_harmbench, "advbench": read_advbench,
    "jailbreakbench": read_jailbreakbench, "hex-phi": read_hex_phi, "harmful-hex-phi": read_harmful_hex_phi,
    "do-not-answer": read_do_not_answer, "lines": read_lines,
}

_CSV_SIGNATURES = (("forbidden_prompt", "strongreject"), ("BehaviorID", "harmbench"), ("goal", "advbench"),
                   ("Goal", "jailbreakbench"))


def guess_format(path: Path) -> str:
    """The format of ``path`` from its extension, CSV header or first JSON line."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header = path.open(encoding="utf-8").readline()
        for column, name in _CSV_SIGNATURES:
            if column in header.split(",") or column in [c.strip() for c in header.split(",")]:
                return name
        raise BenchmarkFileError(f"{path}:1: unrecognised CSV header; pass the format explicitly ({', '.join(READERS)})")
    if suffix in (".jsonl", ".json"):
        for line, record in _json_rows(path):
            if isinstance(record, list) or (isinstance(record, dict) and "messages" in record):
                return "harmful-hex-phi"
            if isinstance(record, dict) and "question" in record:
                return "do-not-answer"
            return "hex-phi"
        raise BenchmarkFileError(f"{path}: the file has no rows")
    return "lines"


def read_benchmark(path: str | Path, format: str | None = None) -> list[AttackTarget]:
    """Read a benchmark file (format guessed when not given). Raises :class:`BenchmarkFileError`."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(f"{path}: no such file")
    name = format or guess_format(path)
    if name not in READERS:
        raise BenchmarkFileError(f"unknown benchmark format {name!r}; expected one of {', '.join(READERS)}")
    targets = READERS[name](path)
    if not targets:
        raise BenchmarkFileError(f"{path}: the file has no rows")
    return targets
