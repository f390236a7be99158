"""The constrained recipe's cached reference log-probs line up with the padded batch.

The token-wise constrained objective (Qi et al., Eq. 3),
``−Σ_t (2/β_t) · log σ(β_t · (log π_θ(y_t|·) − log π_ref(y_t|·)))``, compares, at every supervised
target ``t``, the policy's and the reference's log-probability *of the same token given the same
prefix*. ``ConstrainedRecipe(cache_reference=True)`` computes the reference log-probs once per
unpadded row and places them into left-padded batches; they must equal, position by position,
``log π_ref(y_t | y_<t)`` from a fresh reference forward pass on that same padded batch. The
expected values here are computed in the test with ``log_softmax`` of the reference's logits at
``t − 1`` gathered at ``y_t``.
"""

from __future__ import annotations

import random

import pytest
import torch

import deepalign.training.recipes as recipes
from deepalign.data.rows import UtilityExample
from deepalign.models.loading import tiny_random_model
from deepalign.training.recipes import ConstrainedRecipe, make_batch


def chat_rows(world):
    """Rows whose renderings have different lengths (prompt paraphrases, long and short answers)."""
    rows = []
    for n, item in enumerate(world.benign_items()[:4]):
        answer = world.compliant_response(item)
        rows.append(UtilityExample(world.request(item, n % 2), answer if n % 2 else " ".join(answer.split()[:3 + n])))
    return rows


def spy_reference(monkeypatch):
    """Record the reference log-probs that loss_terms hands to the constrained loss."""
    seen = []
    original = recipes.constrained_token_loss

    def spy(policy, reference, loss_mask, betas=None):
        seen.append(reference.detach().clone())
        return original(policy, reference, loss_mask, betas)

    monkeypatch.setattr(recipes, "constrained_token_loss", spy)
    return seen


@torch.no_grad()
def fresh_reference_logprobs(reference, batch) -> torch.Tensor:
    """``log π_ref(y_t | y_<t)`` at every t ≥ 1 of the padded batch, from its own forward pass."""
    logits = reference(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    ids = batch["input_ids"]
    out = torch.zeros(ids.shape, dtype=torch.float64)
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            out[b, t] = torch.log_softmax(logits[b, t - 1], dim=-1)[ids[b, t]]
    return out


def test_cached_reference_logprobs_equal_a_fresh_pass_on_the_padded_batch(world, tokenizer, monkeypatch):
    rows = chat_rows(world)
    reference = tiny_random_model(vocab_size=len(tokenizer), seed=11)
    policy = tiny_random_model(vocab_size=len(tokenizer), seed=12)
    cached = ConstrainedRecipe(tokenizer, rows, reference, cache_reference=True, progress=False)
    online = ConstrainedRecipe(tokenizer, rows, reference, cache_reference=False, progress=False)
    seen = spy_reference(monkeypatch)
    padded_batches = 0
    for seed in range(6):
        items = cached.sample(random.Random(seed), 4)
        batch = make_batch(items, tokenizer.pad_token_id)
        lengths = batch["attention_mask"].sum(1)
        padded_batches += int(lengths.min() < lengths.max())
        with torch.no_grad():
            loss_cached = cached.loss_terms(policy, batch)["loss"]
            loss_online = online.loss_terms(policy, batch)["loss"]
        used_cached, used_online = seen[-2], seen[-1]
        want = fresh_reference_logprobs(reference, batch)
        supervised = batch["loss_mask"]
        assert supervised.sum() > 0
        # Every supervised target, position by position (the ones the loss reads).
        diff = (used_cached.double() - want)[supervised].abs().max().item()
        assert diff < 1e-5, f"batch {seed}: cached reference log-probs off by {diff:.3g} on supervised tokens"
        # And every real target whose prefix is real (not the first token of a row).
        real = batch["attention_mask"].bool()
        targets = real.clone()
        targets[:, 1:] &= real[:, :-1]
        targets[:, 0] = False
        assert (used_cached.double() - want)[targets].abs().max().item() < 1e-5
        assert (used_online.double() - want)[supervised].abs().max().item() < 1e-5
        assert abs(float(loss_cached) - float(loss_online)) < 1e-6, (seed, float(loss_cached), float(loss_online))
    assert padded_batches >= 4  # the sampled batches really mix rows of different lengths


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 1, 3, 0)])
def test_cached_loss_equals_online_loss_for_chosen_row_mixes(world, tokenizer, order):
    """Explicit mixes of long and short rows, including a repeated row."""
    rows = chat_rows(world)
    reference = tiny_random_model(vocab_size=len(tokenizer), seed=21)
    policy = tiny_random_model(vocab_size=len(tokenizer), seed=22)
    cached = ConstrainedRecipe(tokenizer, rows, reference, cache_reference=True, progress=False)
    online = ConstrainedRecipe(tokenizer, rows, reference, cache_reference=False, progress=False)
    items = [cached.augmenter.utility(rows[i], i) for i in order]
    batch = make_batch(items, tokenizer.pad_token_id)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1
    with torch.no_grad():
        a, b = cached.loss_terms(policy, batch)["loss"], online.loss_terms(policy, batch)["loss"]
    assert abs(float(a) - float(b)) < 1e-6, (float(a), float(b))
