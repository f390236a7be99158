"""Optimiser and schedule settings, and gradient checkpointing (PRESTO included)."""

from __future__ import annotations

import math

import pytest
import torch

from deepalign.errors import InputError
from deepalign.models.loading import tiny_random_model
from deepalign.training.recipes import DARecipe, make_batch
from deepalign.training.trainer import Trainer, TrainerConfig, enable_checkpointing, is_checkpointing
from tests.training.test_trainer import safety_rows, utility_rows


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), steps=10, batch_size=4, lr=1e-3, progress=False)
    values.update(overrides)
    return TrainerConfig(**values)


def test_gradient_checkpointing_gives_the_same_presto_loss_and_gradients(world, tokenizer):
    import random

    recipe = DARecipe(tokenizer, safety_rows(world), utility_rows(world), presto_weight=1.0, safety_fraction=0.5)
    batch = make_batch(recipe.sample(random.Random(3), 4), tokenizer.pad_token_id)
    results = []
    for checkpointing in (False, True):
        model = tiny_random_model(vocab_size=len(tokenizer), attn_implementation="deepalign", seed=7).train()
        if checkpointing:
            enable_checkpointing(model)
            assert is_checkpointing(model)
        terms = recipe.loss_terms(model, batch)
        terms["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((float(terms["loss"]), float(terms["presto"]), grads))
    (loss_a, presto_a, grads_a), (loss_b, presto_b, grads_b) = results
    assert presto_a != 0 and loss_a == pytest.approx(loss_b, abs=1e-6) and presto_a == pytest.approx(presto_b, abs=1e-6)
    assert torch.allclose(grads_a, grads_b, atol=1e-6) and grads_a.abs().max() > 0


def test_the_trainer_turns_checkpointing_on(world, tokenizer, tmp_path):
    from deepalign.training.recipes import SFTRecipe

    model = tiny_random_model(vocab_size=len(tokenizer))
    trainer = Trainer(model, tokenizer, SFTRecipe(tokenizer, utility_rows(world)),
                      config(tmp_path, gradient_checkpointing=True))
    assert is_checkpointing(trainer.accelerator.unwrap_model(trainer.model))


@pytest.mark.parametrize("scheduler, factors", [
    # warm-up 2 of 10 steps: (s+1)/2 for s < 2, then from the definition of each schedule
    ("linear", [0.5, 1.0] + [1 - (s - 2) / 8 for s in range(2, 10)]),
    ("constant", [0.5, 1.0] + [1.0] * 8),
    ("cosine", [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]),
])
def test_schedules_and_betas(world, tokenizer, tmp_path, scheduler, factors):
    from deepalign.training.recipes import SFTRecipe

    trainer = Trainer(tiny_random_model(vocab_size=len(tokenizer)), tokenizer, SFTRecipe(tokenizer, utility_rows(world)),
                      config(tmp_path, warmup_steps=2, scheduler=scheduler, adam_beta1=0.5, adam_beta2=0.95,
                             weight_decay=0.01))
    assert [trainer._lr_factor(s) for s in range(10)] == pytest.approx(factors)
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.5, 0.95) and group["weight_decay"] == 0.01


def test_bad_optimiser_settings_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"adam_beta1 must be in \[0, 1\), got 1.0"):
        config(tmp_path, adam_beta1=1.0)
    with pytest.raises(InputError, match="scheduler must be one of linear, constant, cosine"):
        config(tmp_path, scheduler="step")
