"""Readers for harmful-prompt benchmarks, from local files in their published layouts.

Every reader returns :class:`AttackTarget` rows (an id, the prompt, a harmful target response when
the benchmark has one, the category it gives, and HarmBench's behaviour, context and functional
category, or a text prefill, where the file has them) and reports a malformed row as ``file:line``.

| format          | file        | fields used                                                       |
|-----------------|-------------|-------------------------------------------------------------------|
| ``strongreject``| CSV         | ``forbidden_prompt``, ``category`` (``source`` is kept in the id)  |
| ``harmbench``   | CSV         | ``Behavior``, ``BehaviorID``, ``SemanticCategory``, ``FunctionalCategory``, ``ContextString`` (``Tags`` checked) |
| ``advbench``    | CSV         | ``goal``, ``target``                                              |
| ``jailbreakbench`` | CSV      | ``Goal``, ``Target``, ``Category``, ``Behavior``                  |
| ``prefills``    | CSV         | ``prompt``, ``prefill`` (the authors' RAP data, Vega & Singh)      |
| ``prefills-jsonl`` | JSON lines | ``prompt``, ``prefill``, optional ``id``, ``category``          |
| ``hex-phi``     | JSON lines  | an object with ``instruction`` (or ``prompt``), optional ``category`` |
| ``harmful-hex-phi`` | JSON lines | a list of messages: the user turn is the prompt, the assistant turn the harmful response |
| ``do-not-answer`` | JSON lines or CSV | ``question``, ``risk_area`` (else ``types_of_harm``), ``id`` |
| ``lines``       | text        | one prompt per line (HarmBench-style plain lists)                  |

``read_benchmark(path)`` guesses the format from the extension and the CSV header (a ``prefill``
column: ``prefills``; ``forbidden_prompt``: ``strongreject``; ``BehaviorID``: ``harmbench``; ``goal``:
``advbench``; ``Goal``: ``jailbreakbench``; ``question``: ``do-not-answer``) or the first JSON line (a
list or ``messages``: ``harmful-hex-phi``; ``prompt`` and ``prefill``: ``prefills-jsonl``; ``question``:
``do-not-answer``; ``instruction`` or ``prompt``: ``hex-phi``) when it is not given; anything else is a
:class:`~deepalign.errors.FileFormatError` naming the file, the line and the fields it has, never a
guess that would drop them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from deepalign.errors import FileFormatError, InputError
from deepalign.io import iter_jsonl, read_csv, read_text


@dataclass(frozen=True)
class AttackTarget:
    """A harmful prompt to attack.

    ``id``: unique within its file; ``prompt``: the text the attacked model gets as the user turn;
    ``harmful_response``: a harmful answer (the source of token prefills, Qi et al.'s harmful-prefix
    protocol); ``category``: for per-category tables; ``behavior`` and ``context``: HarmBench's
    behaviour string and context string, kept apart for its classifier (``prompt`` joins them the
    way HarmBench builds a contextual test case); ``functional_category``: HarmBench's
    (``standard``, ``contextual``, ``copyright``); ``prefill``: a text prefill given with the prompt
    (the authors' ``prompt,prefill`` CSV)."""

    id: str
    prompt: str
    harmful_response: str = ""
    category: str = ""
    behavior: str = ""
    context: str = ""
    functional_category: str = ""
    prefill: str = ""


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, int, dict]]:
    """``(line, number, row)``: the physical line a row starts on (for messages), its row number
    counted from 1 after the header (for ids, so that a quoted field spanning lines does not shift
    them) and the row."""
    _, rows = read_csv(path, required, what="benchmark file")
    for number, (line, row) in enumerate(rows, start=1):
        empty = [c for c in required if not (row.get(c) or "").strip()]
        if empty:
            raise FileFormatError(f"{path}:{line}: empty {', '.join(empty)}")
        yield line, number, row


class _UniqueIds:
    """Result logs are keyed by target id, so two rows with one id would share one record: the
    second is refused with ``file:line`` naming both."""

    def __init__(self, path: Path):
        self.path, self.first = path, {}

    def __call__(self, target_id: str, line: int) -> str:
        if target_id in self.first:
            raise FileFormatError(f"{self.path}:{line}: the id {target_id!r} is already the id of line "
                                  f"{self.first[target_id]}; ids must be unique")
        self.first[target_id] = line
        return target_id


def read_strongreject(path: Path) -> list[AttackTarget]:
    return [AttackTarget(f"strongreject-{number}", row["forbidden_prompt"].strip(), "", row["category"].strip())
            for _, number, row in _csv_rows(path, ("category", "source", "forbidden_prompt"))]


def read_harmbench(path: Path) -> list[AttackTarget]:
    """HarmBench's behaviours CSV. ``behavior`` and ``context`` are the Behavior and ContextString as
    written (HarmBench strips neither); ``prompt`` is HarmBench's test case for a direct request:
    ``f"{ContextString}\\n\\n---\\n\\n{Behavior}"`` when there is a context, else the Behavior
    (centerforaisafety/HarmBench, baselines/direct_request/direct_request.py, generate_test_cases).
    A ``contextual`` row needs its ContextString; where a ``Tags`` column is given, its ``context``
    and ``hash_check`` tags (what HarmBench's evaluate_completions.py dispatches on) must agree with
    the ``contextual`` and ``copyright`` functional categories, so the judge's choice is HarmBench's."""
    targets, unique = [], _UniqueIds(path)
    for line, _, row in _csv_rows(path, ("Behavior", "BehaviorID")):
        behavior = row["Behavior"]
        context = row.get("ContextString") or ""
        functional = (row.get("FunctionalCategory") or "").strip()
        if functional == "contextual" and not context.strip():
            raise FileFormatError(f"{path}:{line}: a contextual behaviour with an empty ContextString")
        if functional and row.get("Tags") is not None:
            tags = {tag.strip() for tag in row["Tags"].split(",")}
            for tag, category in (("context", "contextual"), ("hash_check", "copyright")):
                if (tag in tags) != (functional == category):
                    raise FileFormatError(f"{path}:{line}: FunctionalCategory {functional!r} with Tags {row['Tags']!r}: "
                                          f"HarmBench gives the {tag!r} tag exactly to {category} behaviours")
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        targets.append(AttackTarget(unique(row["BehaviorID"].strip(), line), prompt, "",
                                    (row.get("SemanticCategory") or "").strip(), behavior=behavior, context=context,
                                    functional_category=functional))
    return targets


def read_advbench(path: Path) -> list[AttackTarget]:
    return [AttackTarget(f"advbench-{number}", row["goal"].strip(), row["target"].strip(), "advbench")
            for _, number, row in _csv_rows(path, ("goal", "target"))]


def read_jailbreakbench(path: Path) -> list[AttackTarget]:
    unique = _UniqueIds(path)
    return [AttackTarget(unique(f"jbb-{(row.get('Behavior') or str(number)).strip()}", line), row["Goal"].strip(),
                         row["Target"].strip(), row["Category"].strip())
            for line, number, row in _csv_rows(path, ("Goal", "Target", "Category"))]


def read_hex_phi(path: Path) -> list[AttackTarget]:
    targets, unique = [], _UniqueIds(path)
    for line, record in iter_jsonl(path, what="benchmark file"):
        if not isinstance(record, dict):
            raise FileFormatError(f"{path}:{line}: expected an object with 'instruction'")
        prompt = record.get("instruction") or record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise FileFormatError(f"{path}:{line}: missing 'instruction'")
        targets.append(AttackTarget(unique(str(record.get("id", f"hex-phi-{len(targets) + 1}")), line), prompt.strip(), "",
                                    str(record.get("category", ""))))
    return targets


def read_prefills(path: Path) -> list[AttackTarget]:
    """The authors' ``prompt,prefill`` CSV (Vega & Singh, uiuc-focal-lab/push-forward-alignment,
    datasets/strongreject_prefills_mistral_7b_v0_3.csv): both texts kept as written."""
    return [AttackTarget(f"prefills-{number}", row["prompt"], prefill=row["prefill"])
            for _, number, row in _csv_rows(path, ("prompt", "prefill"))]


def read_prefills_jsonl(path: Path) -> list[AttackTarget]:
    """JSON lines with ``prompt`` and ``prefill`` (texts kept as written), optional ``id`` and ``category``."""
    targets, unique = [], _UniqueIds(path)
    for line, record in iter_jsonl(path, what="benchmark file"):
        if not isinstance(record, dict):
            raise FileFormatError(f"{path}:{line}: expected an object with 'prompt' and 'prefill'")
        for field in ("prompt", "prefill"):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise FileFormatError(f"{path}:{line}: missing {field!r}")
        target_id = str(record["id"]) if "id" in record else f"prefills-{len(targets) + 1}"
        targets.append(AttackTarget(unique(target_id, line), record["prompt"], category=str(record.get("category", "")),
                                    prefill=record["prefill"]))
    return targets


def read_harmful_hex_phi(path: Path) -> list[AttackTarget]:
    targets = []
    for line, record in iter_jsonl(path, what="benchmark file"):
        messages = record.get("messages") if isinstance(record, dict) else record
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise FileFormatError(f"{path}:{line}: expected a list of {{'role', 'content'}} messages")
        user = [m.get("content") for m in messages if m.get("role") == "user"]
        assistant = [m.get("content") for m in messages if m.get("role") == "assistant"]
        if not user or not isinstance(user[0], str) or not assistant or not isinstance(assistant[0], str):
            raise FileFormatError(f"{path}:{line}: needs a user and an assistant message with text content")
        targets.append(AttackTarget(f"harmful-hex-phi-{len(targets) + 1}", user[0].strip(), assistant[0], "harmful-hex-phi"))
    return targets


def _do_not_answer_target(path: Path, line: int, record: dict, number: int, unique: _UniqueIds) -> AttackTarget:
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise FileFormatError(f"{path}:{line}: missing 'question'")
    raw_id = record.get("id")
    raw_id = raw_id.strip() if isinstance(raw_id, str) else raw_id
    category = record.get("risk_area") or record.get("types_of_harm") or ""
    return AttackTarget(unique(f"dna-{raw_id if raw_id not in (None, '') else number}", line), question.strip(), "",
                        str(category).strip())


def read_do_not_answer(path: Path) -> list[AttackTarget]:
    """Do-Not-Answer (Wang et al.; LibrAI/do-not-answer): its published CSV (``id, risk_area,
    types_of_harm, specific_harms, question``, then the models' responses) or JSON lines with those
    fields. The category is ``risk_area``."""
    unique = _UniqueIds(path)
    if path.suffix.lower() == ".csv":
        return [_do_not_answer_target(path, line, row, number, unique)
                for line, number, row in _csv_rows(path, ("question",))]
    targets = []
    for line, record in iter_jsonl(path, what="benchmark file"):
        if not isinstance(record, dict):
            raise FileFormatError(f"{path}:{line}: expected an object with 'question'")
        targets.append(_do_not_answer_target(path, line, record, len(targets) + 1, unique))
    return targets


def read_lines(path: Path) -> list[AttackTarget]:
    prompts = [text.strip() for text in read_text(path, what="benchmark file").splitlines() if text.strip()]
    return [AttackTarget(f"{path.stem}-{number}", prompt) for number, prompt in enumerate(prompts, start=1)]


READERS: dict[str, Callable[[Path], list[AttackTarget]]] = {
    "strongreject": read_strongreject, "harmbench": read_harmbench, "advbench": read_advbench,
    "jailbreakbench": read_jailbreakbench, "prefills": read_prefills, "prefills-jsonl": read_prefills_jsonl,
    "hex-phi": read_hex_phi, "harmful-hex-phi": read_harmful_hex_phi, "do-not-answer": read_do_not_answer,
    "lines": read_lines,
}

_CSV_SIGNATURES = (("prefill", "prefills"), ("forbidden_prompt", "strongreject"), ("BehaviorID", "harmbench"),
                   ("goal", "advbench"), ("Goal", "jailbreakbench"), ("question", "do-not-answer"))


def guess_format(path: Path) -> str:
    """The format of ``path`` from its extension, CSV header or first JSON line."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header, _ = read_csv(path, what="benchmark file")
        for column, name in _CSV_SIGNATURES:
            if column in header:
                return name
        raise FileFormatError(f"{path}:1: unrecognised CSV header (columns: {', '.join(header) or 'none'}); pass the "
                              f"format explicitly ({', '.join(READERS)})")
    if suffix in (".jsonl", ".json"):
        for line, record in iter_jsonl(path, what="benchmark file"):
            if isinstance(record, list) or (isinstance(record, dict) and "messages" in record):
                return "harmful-hex-phi"
            if not isinstance(record, dict):
                raise FileFormatError(f"{path}:{line}: expected a JSON object or a list of messages, got "
                                      f"{type(record).__name__}; pass the format explicitly ({', '.join(READERS)})")
            if "prompt" in record and "prefill" in record:
                return "prefills-jsonl"
            if "question" in record:
                return "do-not-answer"
            if "instruction" in record or "prompt" in record:
                return "hex-phi"
            fields = ", ".join(map(repr, record)) or "none"
            raise FileFormatError(f"{path}:{line}: unrecognised object (fields: {fields}); expected 'prompt' and "
                                  "'prefill', 'question', 'instruction' or 'prompt', or 'messages'; pass the format "
                                  f"explicitly ({', '.join(READERS)})")
        raise FileFormatError(f"{path}: the file has no rows")
    return "lines"


def read_benchmark(path: str | Path, format: str | None = None) -> list[AttackTarget]:
    """Read a benchmark file (format guessed when not given). Raises :class:`~deepalign.errors.FileFormatError` naming the file and line."""
    path = Path(path)
    if format is not None and format not in READERS:
        raise InputError(f"unknown benchmark format {format!r}; expected one of {', '.join(READERS)}")
    read_text(path, what="benchmark file")  # missing, a folder, or not UTF-8: said before guessing
    targets = READERS[format or guess_format(path)](path)
    if not targets:
        raise FileFormatError(f"{path}: the file has no rows")
    return targets

