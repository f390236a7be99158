"""Attention knockout through TransformerLens hooks = the same blocking as a 4-D mask in Hugging Face."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepalign.analysis.attention import load_bridge
from deepalign.analysis.knockout import best_correct_rank, knockout_ranks, knockout_ranks_over, response_knockout
from deepalign.models.chat import encode_text, render_chat
from deepalign.models.loading import load_pretrained
from deepalign.models.safety_cls import additive_mask
from tests.helpers import save_tiny_model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("knockout-model"), tokenizer, seed=11, layers=3)


@given(length=st.integers(1, 12), data=st.data())
def test_response_knockout_blocks_earlier_response_keys_only(length, data):
    start = data.draw(st.integers(0, length))
    stop = data.draw(st.integers(start, length))
    blocked = response_knockout(length, slice(start, stop))
    for i in range(length):
        for j in range(length):
            assert bool(blocked[i, j]) == (start <= j < i < stop)


def test_response_knockout_rejects_a_span_outside_the_sequence():
    with pytest.raises(ValueError, match="does not fit"):
        response_knockout(4, slice(2, 6))


def hf_ranks(model, tokenizer, prompt, answer, block: bool) -> torch.Tensor:
    """Reference: the same knockout in every layer as an additive 4-D mask on the eager model."""
    tokens = encode_text(tokenizer, answer)
    spans = render_chat(tokenizer, prompt, response=tokens, close_turn=False)
    length = len(spans)
    visible = torch.ones(length, length, dtype=torch.bool).tril()
    if block:
        visible &= ~response_knockout(length, spans.response)
    logits = model(torch.tensor([spans.input_ids]), attention_mask=additive_mask(visible[None], torch.float32)).logits
    predicting = logits[0, spans.response.start - 1: spans.response.stop - 1].double()
    targets = torch.tensor(tokens)
    return (predicting > predicting.gather(1, targets[:, None])).sum(-1)


@torch.no_grad()
def test_knockout_in_every_layer_matches_a_mask_and_changes_the_ranks(world, tokenizer, saved_model):
    bridge = load_bridge(saved_model)
    model, _ = load_pretrained(saved_model, attn_implementation="eager")
    changed = False
    for item in world.harmful_items()[:3]:
        prompt, answer = world.request(item), world.compliant_response(item)
        plain = knockout_ranks(bridge, prompt, answer, ())
        blocked = knockout_ranks(bridge, prompt, answer, range(3))
        assert torch.equal(plain, hf_ranks(model, tokenizer, prompt, answer, block=False))
        assert torch.equal(blocked, hf_ranks(model, tokenizer, prompt, answer, block=True))
        assert plain.shape == (len(encode_text(tokenizer, answer)),) and plain.dtype == torch.int64
        assert plain[0] == blocked[0]  # the first answer token reads no earlier answer token
        changed |= not torch.equal(plain, blocked)
    assert changed


def test_ranks_over_pairs_and_bad_input(world, saved_model):
    bridge = load_bridge(saved_model)
    pairs = [(world.request(i), world.compliant_response(i)) for i in world.harmful_items()[:2]]
    assert torch.equal(knockout_ranks_over(bridge, pairs, [1]),
                       torch.cat([knockout_ranks(bridge, p, a, [1]) for p, a in pairs]))
    with pytest.raises(ValueError, match="pairs is empty"):
        knockout_ranks_over(bridge, [], [1])
    with pytest.raises(ValueError, match="out of range"):
        knockout_ranks(bridge, *pairs[0], [3])
    with pytest.raises(ValueError, match="empty"):
        knockout_ranks(bridge, pairs[0][0], "", [0])


def test_best_correct_rank_is_the_best_ranked_valid_choice():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=generator, dtype=torch.float64)
    logits[2, 4] = logits[2, 7]  # a tie between a choice and another token
    targets = torch.tensor([0, 3, 4, 5, 9, 10])
    alternatives = [[], [1, 2], [7], [5], [0, 1, 2, 3], [10, 6]]
    got = best_correct_rank(logits, targets, alternatives)
    for t in range(6):  # the definition: the smallest rank over the valid choices
        ranks = [int((logits[t] > logits[t, a]).sum()) for a in {int(targets[t]), *alternatives[t]}]
        assert got[t] == min(ranks)
    assert torch.equal(best_correct_rank(logits, targets),
                       torch.tensor([int((logits[t] > logits[t, targets[t]]).sum()) for t in range(6)]))
    with pytest.raises(ValueError, match="alternatives has 1 rows for 6"):
        best_correct_rank(logits, targets, [[1]])
