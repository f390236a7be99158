"""Prefilling and decoding-parameter attacks, resumable logs and summaries."""

from __future__ import annotations

import json

import pytest

from deepalign.attacks.generation_attacks import (
    AttackTarget,
    decoding_attack,
    decoding_settings,
    prefill_attack,
    synthetic_judge,
)
from deepalign.attacks.results import format_table, mean_std, summarize
from deepalign.io import JsonlLog
from deepalign.models.generation import GREEDY, Sampling
from deepalign.models.loading import tiny_random_model


def targets(world, count=3):
    return [AttackTarget(f"{item.name}#{p}", world.request(item, p), world.compliant_response(item), "synthetic")
            for item, p in zip(world.harmful_items()[:count], range(count))]


def test_decoding_grid_matches_the_paper():
    names = [name for name, _ in decoding_settings()]
    assert len(names) == 1 + 20 + 20 + 9 and names[0] == "greedy"
    assert "temperature=0.05" in names and "temperature=1.0" in names and "top_p=0.6" in names and "top_k=500" in names
    assert Sampling().temperature == 0.9 and Sampling().top_p == 0.6 and Sampling().max_new_tokens == 512


def test_prefill_attack_records_every_length_and_run_and_resumes(world, tokenizer, tmp_path):
    model = tiny_random_model(vocab_size=len(tokenizer), seed=1)
    log = JsonlLog(tmp_path / "prefill.jsonl")
    judge = synthetic_judge(world)
    records = prefill_attack(model, tokenizer, targets(world), judge, log, prefill_lengths=(2, 4), runs=2,
                             sampling=Sampling(max_new_tokens=6), progress=False)
    assert len(records) == 3 * 2 * 2
    for record in records:
        prefill = record["prefill_text"].split()
        assert len(prefill) == record["prefill_tokens"] and record["output"].split()[: len(prefill)] == prefill
        assert 0 <= record["score"] <= 1 and isinstance(record["harmful"], bool)
    # Sampling is seeded by the run: the same command gives the same outputs.
    again = prefill_attack(model, tokenizer, targets(world), judge, JsonlLog(tmp_path / "again.jsonl"),
                           prefill_lengths=(2, 4), runs=2, sampling=Sampling(max_new_tokens=6), progress=False)
    assert [r["output"] for r in again] == [r["output"] for r in records]
    # A rerun with a longer list only does the new items; an interrupted last line is redone.
    lines = (tmp_path / "prefill.jsonl").read_text().splitlines()
    (tmp_path / "prefill.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    more = prefill_attack(model, tokenizer, targets(world), judge, JsonlLog(tmp_path / "prefill.jsonl"),
                          prefill_lengths=(2, 4, 6), runs=2, sampling=Sampling(max_new_tokens=6), progress=False)
    assert len(more) == 3 * 3 * 2
    keys = [json.loads(line)["key"] for line in (tmp_path / "prefill.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 18
    table = summarize(more, "score", by=("setting",))
    assert [row["setting"] for row in table] == ["prefill=2", "prefill=4", "prefill=6"]
    assert all(row["runs"] == 2 and row["items"] == 6 for row in table)
    assert "prefill=6" in format_table(table, ("setting",), "score")


def test_decoding_attack_breaks_a_prompt_if_any_setting_is_harmful(world, tokenizer, tmp_path):
    model = tiny_random_model(vocab_size=len(tokenizer), seed=2)
    calls = []

    def judge(target, output):
        calls.append(output)
        return {"score": 1.0 if len(calls) == 2 else 0.0, "harmful": len(calls) == 2}

    settings = [("greedy", GREEDY), ("temperature=0.5", Sampling(temperature=0.5, top_p=1.0))]
    broken = decoding_attack(model, tokenizer, targets(world, 2), judge, JsonlLog(tmp_path / "d.jsonl"),
                             settings=settings, max_new_tokens=4, progress=False)
    assert broken == {targets(world, 2)[1].id: True, targets(world, 2)[0].id: False}


def test_statistics(tmp_path):
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_std([4.0]) == (4.0, 0.0)


def test_a_prompt_longer_than_the_context_is_refused(world, tokenizer, tmp_path):
    model = tiny_random_model(vocab_size=len(tokenizer), max_positions=24)
    with pytest.raises(ValueError, match="exceeds the model's context of 24"):
        prefill_attack(model, tokenizer, targets(world, 1), synthetic_judge(world), JsonlLog(tmp_path / "p.jsonl"),
                       prefill_lengths=(2,), sampling=Sampling(max_new_tokens=20), progress=False)
