"""Utility: what a defense costs on ordinary tasks. GSM8K accuracy (final-number match) and SAMSum
ROUGE-1, as Qi et al. evaluate them (Unispac/shallow-vs-deep-alignment), and the generation loop that
runs a model on a file of problems into a resumable log.

Facts taken from their code (each is deepalign's default):

* **Prompts** (``finetuning_buckets/datasets/utils/get_eval_data.py``): GSM8K: system prompt
  ``"You are a helpful assistant."``, the user turn is the question unchanged (no instruction, no
  few-shot examples); SAMSum: system prompt ``"You are a helpful assistant for dialog
  summarization."``, the user turn ``"Summarize this dialog:\\n" + dialogue``. Both are laid out with
  the model's chat template, the assistant turn open.
* **Generation** (``eval_utility.py``, its script defaults): sampling with temperature 0.9, top-p
  0.6, top-k 50, at most 1024 new tokens, 16 prompts per device batch.
* **GSM8K score** (``finetuning_buckets/inference/utility_eval/gsm8k_eval.py`` and ``evaluator.py``'s
  ``gsm8k_metric``): the first match of ``#### (-?[0-9.,]+)`` in the output, stripped, commas removed,
  read as a float, must equal the reference's number read the same way; no match (or no number) is
  ``[invalid]``, a miss. So a model must end its answer in GSM8K's ``#### N`` form to score, as the
  models they fine-tune on GSM8K do. ``extract="last-number"`` (the last number anywhere in the
  output) is offered for models never taught that form; it is deepalign's option, not theirs.
* **SAMSum score** (``rouge_eval.py``, ``evaluator.py``'s ``rouge_1_metric``): ``rouge_score``'s
  ``RougeScorer(["rouge1"], use_stemmer=True).score(reference, output)`` per dialogue; the reported
  numbers are the means of its precision, recall and F-measure (F is the headline). The scorer is the
  maintained ``rouge-score`` package (``pip install 'deepalign[eval]'``), imported when a score is
  asked for.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from tqdm.auto import tqdm

from deepalign.data.utility_files import Dialogue, MathProblem, parse_final_number
from deepalign.errors import InputError, check_int
from deepalign.io import JsonlLog
from deepalign.models.generation import Sampling, generate_after_prefill

GSM8K_SYSTEM = "You are a helpful assistant."
SAMSUM_SYSTEM = "You are a helpful assistant for dialog summarization."
SAMSUM_INSTRUCTION = "Summarize this dialog:\n"
# eval_utility.py's ScriptArguments: do_sample, temperature 0.9, top_p 0.6, top_k 50, max_new_tokens 1024.
QI_UTILITY_SAMPLING = Sampling(temperature=0.9, top_p=0.6, top_k=50, max_new_tokens=1024)
QI_UTILITY_BATCH = 16  # batch_size_per_device
EXTRACTORS = ("qi", "last-number")
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+")


# ----- GSM8K --------------------------------------------------------------------------------------

def last_number(text: str) -> float | None:
    """The last number written anywhere in ``text`` (commas inside it dropped), ``None`` when there
    is none. deepalign's alternative to Qi et al.'s ``#### N`` rule, for models not taught that form."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def final_answer(output: str, extract: str = "qi") -> float | None:
    """The final number of a model's answer: ``"qi"`` (default) reads it after ``#### `` as Qi et
    al.'s GSM8K evaluator does (:func:`deepalign.data.utility_files.parse_final_number`);
    ``"last-number"`` takes the last number in the text."""
    if extract == "qi":
        return parse_final_number(output)
    if extract == "last-number":
        return last_number(output)
    raise InputError(f"extract must be one of {', '.join(EXTRACTORS)}, got {extract!r}")


def gsm8k_correct(output: str, reference: float, extract: str = "qi") -> bool:
    """True when the output's final number equals the reference number (float equality, as Qi et
    al.'s ``gsm8k_metric`` compares ``float(answer) == float(ground_truth)``)."""
    answer = final_answer(output, extract)
    return answer is not None and answer == reference


def gsm8k_prompt(problem: MathProblem) -> str:
    """The user turn for a problem: the question unchanged (get_eval_data.get_gsm8k)."""
    return problem.question


# ----- SAMSum -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rouge:
    precision: float
    recall: float
    fmeasure: float


def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise InputError("ROUGE needs the rouge-score package: pip install 'deepalign[eval]' (or rouge-score==0.1.2)") from None
    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


_SCORER = None


def rouge1(reference: str, prediction: str) -> Rouge:
    """ROUGE-1 of ``prediction`` against ``reference`` with Qi et al.'s scorer settings
    (``RougeScorer(["rouge1"], use_stemmer=True)``, rouge_eval.py): rouge-score's tokens (lower case,
    runs of ``[a-z0-9]``, Porter-stemmed when longer than 3 characters), unigram overlap with clipped
    counts ``m``; precision ``m / |prediction|``, recall ``m / |reference|``, F = their harmonic mean
    (0 when either side has no token)."""
    global _SCORER
    if _SCORER is None:
        _SCORER = _rouge_scorer()
    score = _SCORER.score(reference, prediction)["rouge1"]
    return Rouge(score.precision, score.recall, score.fmeasure)


def samsum_prompt(dialogue: Dialogue) -> str:
    """The user turn for a dialogue: ``"Summarize this dialog:\\n" + dialogue`` (get_eval_data.get_samsum)."""
    return SAMSUM_INSTRUCTION + dialogue.dialogue


# ----- the evaluation loop ------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """One utility task: how a row becomes a prompt, how an output is scored against it (a dict of
    record fields), its default system prompt, and the record fields that describe the row."""

    name: str
    prompt: Callable
    score: Callable[[object, str], dict]
    system: str
    fields: Callable[[object], dict]


def gsm8k_task(extract: str = "qi") -> Task:
    final_answer("", extract)  # an unknown extractor is refused here

    def score(problem: MathProblem, output: str) -> dict:
        answer = final_answer(output, extract)
        return {"answer": answer, "correct": answer is not None and answer == problem.final}

    return Task("gsm8k", gsm8k_prompt, score, GSM8K_SYSTEM,
                lambda p: {"question": p.question, "reference": p.final})


def samsum_task() -> Task:
    _rouge_scorer()  # a missing package is said before any model loads

    def score(dialogue: Dialogue, output: str) -> dict:
        r = rouge1(dialogue.summary, output)
        return {"rouge1_precision": r.precision, "rouge1_recall": r.recall, "rouge1_f": r.fmeasure}

    return Task("samsum", samsum_prompt, score, SAMSUM_SYSTEM, lambda d: {"reference": d.summary})


def generate_and_score(model, tokenizer, rows: Sequence, log: JsonlLog, *, prompt: Callable, score: Callable,
                       fields: Callable, sampling: Sampling, batch_size: int = QI_UTILITY_BATCH,
                       system: str | None = None, seed: int | None = 0, progress: bool = True,
                       description: str = "evaluate", tags: dict | None = None) -> list[dict]:
    """Generate an answer for every row not yet in ``log`` (key: the row's ``id``), score it and
    append one record per row as soon as its batch is done; returns the records of ``rows`` (those
    already in the log included), in the rows' order. Generation is
    :func:`deepalign.models.generation.generate_after_prefill` with no prefill; ``seed`` seeds each
    batch's sampling."""
    check_int("batch_size", batch_size)
    todo = [row for row in rows if row.id not in log]
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=description, disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        began = time.perf_counter()
        outputs = generate_after_prefill(model, tokenizer, [prompt(row) for row in batch], [[] for _ in batch],
                                         sampling, seed=seed, system=system)
        seconds = (time.perf_counter() - began) / len(batch)
        for row, output in zip(batch, outputs):
            log.append({"key": row.id, "id": row.id, **(tags or {}), **fields(row), "output": output,
                        **score(row, output), "seconds": round(seconds, 4)})
            bar.update(1)
    bar.close()
    by_key = {record["key"]: record for record in log.records()}
    return [by_key[row.id] for row in rows if row.id in by_key]


def evaluate_task(model, tokenizer, rows: Sequence, log: JsonlLog, task: Task, *,
                  sampling: Sampling = QI_UTILITY_SAMPLING, batch_size: int = QI_UTILITY_BATCH,
                  system: str | None = "default", seed: int | None = 0, progress: bool = True) -> list[dict]:
    """Run ``task`` (:func:`gsm8k_task`, :func:`samsum_task`) on ``rows``. ``system``: ``"default"``
    (the task's, Qi et al.'s), ``None`` (the chat template's own) or a text."""
    return generate_and_score(model, tokenizer, rows, log, prompt=task.prompt, score=task.score, fields=task.fields,
                              sampling=sampling, batch_size=batch_size,
                              system=task.system if system == "default" else system, seed=seed, progress=progress,
                              description=task.name, tags={"task": task.name})


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def gsm8k_summary(records: list[dict]) -> dict:
    """``{"n", "correct", "accuracy", "no_answer"}`` (outputs with no final number count as misses)."""
    correct = sum(bool(r["correct"]) for r in records)
    return {"n": len(records), "correct": correct, "accuracy": correct / len(records) if records else math.nan,
            "no_answer": sum(r["answer"] is None for r in records)}


def samsum_summary(records: list[dict]) -> dict:
    """Means over dialogues of ROUGE-1 precision, recall and F (Qi et al.'s ``rouge_1_metric``)."""
    return {"n": len(records), "rouge1_f": _mean([r["rouge1_f"] for r in records]),
            "rouge1_precision": _mean([r["rouge1_precision"] for r in records]),
            "rouge1_recall": _mean([r["rouge1_recall"] for r in records])}


def with_max_new_tokens(sampling: Sampling, max_new_tokens: int) -> Sampling:
    return replace(sampling, max_new_tokens=check_int("max_new_tokens", max_new_tokens))
