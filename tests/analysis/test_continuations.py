"""Ranks along a harmful continuation, PFA-1 per prefill length, per-position KL."""

from __future__ import annotations

import pytest
import torch

from deepalign.analysis.continuations import continuation_ranks, per_position_kl, pfa1_by_prefill_length
from deepalign.models.chat import encode_text, render_chat
from deepalign.models.loading import tiny_random_model


def test_ranks_agree_with_a_direct_computation(world, tokenizer):
    model = tiny_random_model(vocab_size=len(tokenizer), seed=7)
    item = world.harmful_items()[0]
    prompt, response = world.request(item), world.compliant_response(item)
    refusal = tokenizer.convert_tokens_to_ids(["sorry", "cannot"])
    profile = continuation_ranks(model, tokenizer, prompt, response, refusal, k=10)
    tokens = encode_text(tokenizer, response)
    spans = render_chat(tokenizer, prompt, response=tokens, close_turn=False)
    logits = model(torch.tensor([spans.input_ids])).logits[0, spans.response.start - 1: spans.response.stop - 1]
    for position, token in enumerate(tokens):
        row = logits[position]
        assert profile.harmful_rank[position] == int((row > row[token]).sum() + ((row == row[token])[:token]).sum())
        best = min(int((row > row[t]).sum() + ((row == row[t])[:t]).sum()) for t in refusal)
        assert profile.refusal_rank[position] == best
    probs = torch.softmax(logits, -1)
    assert torch.allclose(profile.entropy, -(probs * probs.log()).sum(-1), atol=1e-5)
    assert torch.allclose(profile.topk_mass, probs.topk(10, dim=-1).values.sum(-1), atol=1e-5)


def test_kl_of_a_model_with_itself_is_zero_and_differs_across_models(world, tokenizer):
    a, b = tiny_random_model(vocab_size=len(tokenizer), seed=1), tiny_random_model(vocab_size=len(tokenizer), seed=2)
    item = world.harmful_items()[1]
    same = per_position_kl(a, tokenizer, a, tokenizer, world.request(item), world.compliant_response(item))
    assert same.shape == (len(encode_text(tokenizer, world.compliant_response(item))),)
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-6)
    other = per_position_kl(a, tokenizer, b, tokenizer, world.request(item), world.compliant_response(item),
                            system_b="be safe")
    assert (other > 0).all()


def test_pfa1_per_prefill_length(world, tokenizer):
    model = tiny_random_model(vocab_size=len(tokenizer), seed=3)
    item = world.harmful_items()[2]
    scores = pfa1_by_prefill_length(model, model, tokenizer, world.request(item), world.compliant_response(item),
                                    [0, 2, 4])
    assert scores[0] == pytest.approx(1.0)  # no prefill: the model is its own reference
    assert all(-1 <= s <= 1 for s in scores.values())


def test_different_tokenizers_are_refused(world, tokenizer):
    from deepalign.models.loading import smollm2_tokenizer

    model = tiny_random_model(vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="different tokenizers"):
        per_position_kl(model, tokenizer, model, smollm2_tokenizer(), "q", "a")
