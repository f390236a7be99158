"""Stage measurements on the synthetic world (on a tiny random model: ranges and plumbing)."""

from __future__ import annotations

import torch

from deepalign.data.synthetic import SyntheticWorld
from deepalign.experiments.world_evaluation import evaluate_stage, greedy_continuations, harmful_continuation_ranks
from deepalign.models.chat import encode_text
from deepalign.models.loading import tiny_random_model


def test_greedy_continuation_keeps_the_prefill_and_reports_are_in_range():
    world = SyntheticWorld.build(0)
    tokenizer = world.tokenizer()
    model = tiny_random_model(vocab_size=len(tokenizer), seed=0)
    item = world.harmful_items()[0]
    prefill = encode_text(tokenizer, world.compliant_response(item))[:4]
    text = greedy_continuations(model, tokenizer, [world.request(item)], [prefill], max_new_tokens=5)[0]
    assert text.split()[:4] == world.compliant_response(item).split()[:4]
    assert 4 <= len(text.split()) <= 9
    ranks = harmful_continuation_ranks(model, tokenizer, world, [item])
    assert ranks.numel() == len(tokenizer(world.compliant_response(item), add_special_tokens=False)["input_ids"])
    assert ((ranks >= 0) & (ranks < len(tokenizer))).all()
    report = evaluate_stage(model, tokenizer, world, prefill_lengths=(2,), phrasings=(0,))
    assert 0 <= report.first_token_refusal <= 1 and 0 <= report.benign_utility <= 1
    assert set(report.prefill_scores) == {2} and 0 <= report.prefill_scores[2] <= 1
    assert 0 <= report.harmful_rank_top20 <= 1 and torch.isfinite(torch.tensor(report.harmful_rank_median))
