"""Gradient accumulation averages micro-batches: accumulate 2 × batch 2 = batch 4.

Every recipe loss is a mean over the supervised tokens of its (micro-)batch. The four examples
here have the same length (no padding anywhere) and the same number of supervised tokens (21
each), so "the mean of the two micro-batch means" is exactly "the mean over all 84 supervised
tokens of the four", and the gradient the optimizer sees, and the loss the trainer logs, must be
the same for ``grad_accum=2, batch_size=2`` as for ``grad_accum=1, batch_size=4``. A trainer that
sums micro-batch losses (or gradients) instead of averaging gives twice the gradient or twice the
logged loss. The expected values are computed in the test from a fresh copy of the model, with
``log_softmax`` over the four examples' supervised tokens, not with the trainer.
"""

from __future__ import annotations

import torch

from deepalign.data.rows import UtilityExample
from deepalign.models.loading import tiny_random_model
from deepalign.training.recipes import SFTRecipe
from deepalign.training.trainer import Trainer, TrainerConfig

SUPERVISED_PER_EXAMPLE = 21
LENGTH = 31


class FixedOrderRecipe:
    """The SFT recipe's loss, but ``sample`` hands out four fixed items in order (ignoring the
    trainer's RNG), so that both runs see the same four examples."""

    name = "sft"

    def __init__(self, recipe: SFTRecipe, items):
        self.recipe, self.items, self.next = recipe, list(items), 0

    def sample(self, rng, batch_size):
        out = [self.items[(self.next + n) % len(self.items)] for n in range(batch_size)]
        self.next += batch_size
        return out

    def longest(self):
        return self.recipe.longest()

    def loss_terms(self, model, batch):
        return self.recipe.loss_terms(model, batch)


def four_items(world, tokenizer):
    rows = [UtilityExample(world.request(i, p), world.compliant_response(i)) for i in world.benign_items()
            for p in range(2)]
    recipe = SFTRecipe(tokenizer, rows)
    items = [recipe.augmenter.utility(rows[n]) for n in (0, 2, 4, 14)]
    assert [len(item.spans) for item in items] == [LENGTH] * 4
    assert [int(item.loss_mask.sum()) for item in items] == [SUPERVISED_PER_EXAMPLE] * 4
    assert len({item.spans.input_ids for item in items}) == 4
    return recipe, items


def first_step_gradient(model, tokenizer, recipe, tmp_path, *, batch_size, grad_accum):
    """Run one optimizer step; return (logged metrics row, the gradients the optimizer stepped with)."""
    trainer = Trainer(model, tokenizer, recipe, TrainerConfig(
        output_dir=str(tmp_path), steps=1, batch_size=batch_size, grad_accum=grad_accum, lr=1e-4,
        max_grad_norm=0.0, progress=False))
    grads = {}
    params = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())

    def capture(optimizer, args, kwargs):
        for name, p in params.items():
            grads[name] = p.grad.detach().clone()

    trainer.optimizer.optimizer.register_step_pre_hook(capture)
    history = trainer.train()
    assert len(history) == 1 and grads
    return history[0], grads


def oracle(tokenizer, items, seed):
    """Mean NLL over the 84 supervised tokens of the four examples, and its gradient."""
    model = tiny_random_model(vocab_size=len(tokenizer), seed=seed).train()
    ids = torch.tensor([item.spans.input_ids for item in items])
    mask = torch.stack([item.loss_mask for item in items])
    logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                total = total - logprobs[b, t - 1, ids[b, t]]
                count += 1
    assert count == 4 * SUPERVISED_PER_EXAMPLE
    loss = total / count
    loss.backward()
    return float(loss.detach()), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def test_accumulate_two_by_two_equals_one_batch_of_four(world, tokenizer, tmp_path):
    seed = 7
    sft, items = four_items(world, tokenizer)
    want_loss, want_grads = oracle(tokenizer, items, seed)
    runs = {}
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        model = tiny_random_model(vocab_size=len(tokenizer), seed=seed)
        runs[grad_accum] = first_step_gradient(model, tokenizer, FixedOrderRecipe(sft, items),
                                               tmp_path / f"accum{grad_accum}", batch_size=batch_size,
                                               grad_accum=grad_accum)
    for grad_accum, (row, grads) in runs.items():
        assert abs(row["loss"] - want_loss) < 2e-6, (grad_accum, row["loss"], want_loss)
        assert abs(row["nll"] - want_loss) < 2e-6
        assert set(grads) == set(want_grads)
        for name, want in want_grads.items():
            error = float((grads[name] - want).abs().max() / want.abs().max().clamp_min(1e-12))
            ratio = float((grads[name] * want).sum() / (want * want).sum().clamp_min(1e-30))
            assert error < 1e-4, f"grad_accum={grad_accum}: {name} gradient = {ratio:.3f} × expected"
    (row1, grads1), (row2, grads2) = runs[1], runs[2]
    assert abs(row1["loss"] - row2["loss"]) <= 2e-6  # logged rounded to 6 decimals
    norm1 = torch.sqrt(sum((g.double() ** 2).sum() for g in grads1.values()))
    norm2 = torch.sqrt(sum((g.double() ** 2).sum() for g in grads2.values()))
    assert abs(float(norm2 / norm1) - 1) < 1e-4
