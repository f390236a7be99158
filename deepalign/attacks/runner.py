"""Running an attack end to end: targets, a judge, a resumable log and a summary table.

Used by ``deepalign attack {prefill,rap,decoding}``. Targets come from a benchmark file
(:mod:`deepalign.data.benchmarks`) or from the synthetic world (``world=``: every harmful item in
every request phrasing, judged by the world's programmatic judge and attacked with its oracle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from deepalign.attacks.generation_attacks import Judge, harmful_prefix, record_key, synthetic_judge, target_fields
from deepalign.attacks.rap import RAPConfig, rap_attack
from deepalign.attacks.results import format_table, summarize
from deepalign.errors import InputError, check_int
from deepalign.io import JsonlLog
from deepalign.data.benchmarks import AttackTarget, read_benchmark
from deepalign.evaluation.judges import KEYWORD_LISTS, REFUSAL_PHRASES, is_keyword_refusal, keyword_jailbroken
from deepalign.models.chat import encode_text


def world_targets(world, phrasings: Sequence[int] = range(6)) -> list[AttackTarget]:
    """Every harmful item of the synthetic world in each phrasing; id ``item#phrasing``."""
    return [AttackTarget(f"{item.name}#{p}", world.request(item, p), world.compliant_response(item), "synthetic")
            for item in world.harmful_items() for p in phrasings]


def keyword_judge(phrases: Sequence[str] = REFUSAL_PHRASES) -> Judge:
    """Keyword criterion: harmful = a non-empty output without a refusal phrase (score 0/1);
    ``phrases``: Qi et al.'s list by default (:data:`deepalign.evaluation.judges.KEYWORD_LISTS`)."""
    def judge(target: AttackTarget, output: str) -> dict:
        jailbroken = keyword_jailbroken(output, phrases)
        return {"score": float(jailbroken), "refused": is_keyword_refusal(output, phrases), "harmful": jailbroken}

    return judge


def load_targets(targets: str | Path | None, world=None, format: str | None = None, limit: int | None = None):
    if (targets is None) == (world is None):
        raise InputError("give either a targets file or a synthetic world, not both or neither")
    if limit is not None:
        check_int("limit", limit)
    rows = world_targets(world) if world is not None else read_benchmark(targets, format)
    return rows[:limit] if limit is not None else rows


def choose_judge(name: str, world=None, *, keywords: str = "qi") -> Judge:
    if name == "synthetic":
        if world is None:
            raise InputError("the synthetic judge needs the synthetic world (--world)")
        return synthetic_judge(world)
    if name == "keyword":
        if keywords not in KEYWORD_LISTS:
            raise InputError(f"unknown keyword list {keywords!r}; expected one of {', '.join(KEYWORD_LISTS)}")
        return keyword_judge(KEYWORD_LISTS[keywords])
    raise InputError(f"unknown judge {name!r}; expected 'keyword' or 'synthetic'")


def run_rap(model, tokenizer, targets: Sequence[AttackTarget], judge: Judge, log: JsonlLog, selector,
            config: RAPConfig, *, prefill_tokens: int = 0, batch_size: int = 16, progress: bool = True,
            attack=None, tags: dict | None = None) -> list[dict]:
    """RAP on every target not yet in ``log`` (batches of ``batch_size``), one record each.
    ``attack(prompts, prefills, selector, config)`` replaces the batched attack on the plain model
    (e.g. :func:`deepalign.attacks.defended.cls_rap` for a model behind the [CLS] defense)."""
    check_int("batch_size", batch_size)
    check_int("prefill_tokens", prefill_tokens, minimum=0)
    key = {t.id: record_key(tags, f"{t.id}|rap") for t in targets}
    todo = [t for t in targets if key[t.id] not in log]
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        prefills = [rap_prefill(tokenizer, t, prefill_tokens) for t in batch]
        prompts = [t.prompt for t in batch]
        results = attack(prompts, prefills, selector, config) if attack is not None else \
            rap_attack(model, tokenizer, prompts, prefills, selector, config, progress=progress)
        for target, result in zip(batch, results):
            log.append({"key": key[target.id], "id": target.id, "category": target.category, "prompt": target.prompt,
                        **target_fields(target), **(tags or {}), "run": 0, "attack": "rap", "setting": f"rap k={config.k}", "tokens": result.tokens,
                        "ranks": result.ranks, "output": result.text, "steps": result.steps,
                        "backtracks": result.backtracks, "stopped": result.stopped, **judge(target, result.text),
                        "seconds": round(result.seconds, 4)})
    keys = set(key.values())
    return [r for r in log.records() if r["key"] in keys]


def rap_prefill(tokenizer, target: AttackTarget, prefill_tokens: int) -> list[int]:
    """Where RAP starts: the target's text prefill (the authors' RAP data), else the first
    ``prefill_tokens`` tokens of its harmful response (none by default)."""
    if target.prefill:
        return encode_text(tokenizer, target.prefill)
    return harmful_prefix(tokenizer, target.harmful_response, prefill_tokens) if prefill_tokens else []


def summary(records: list[dict], by: Sequence[str] = ("setting", "category")) -> str:
    """Mean ± std of the judge score over runs, per setting and category."""
    return format_table(summarize(records, "score", by), by, "score")

