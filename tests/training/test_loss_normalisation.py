"""The two loss normalisations against their definitions, computed by hand from the same data:
``step`` = Σ_tokens ℓ / N over all micro-batches of the step (Vega & Singh), ``micro-batch`` =
the mean over micro-batches of each one's token mean (Qi et al.)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from deepalign.cli import build_parser
from deepalign.cli.train import trainer_config
from deepalign.data.rows import UtilityExample
from deepalign.errors import InputError
from deepalign.models.loading import tiny_random_model
from deepalign.training.recipes import SFTRecipe, make_batch
from deepalign.training.trainer import Trainer, TrainerConfig


def rows(world):
    # Long and short answers, so that micro-batches hold different token counts.
    return [UtilityExample(world.request(item, p), " ".join([world.compliant_response(item)] * (1 + (n + p) % 3)))
            for n, item in enumerate(world.benign_items()) for p in range(2)]


def token_sums(model, tokenizer, recipe, seed, micro_batches, size):
    """``[(Σ −log p, count)]`` per micro-batch of the first step, from the trainer's data RNG."""
    rng, sums = random.Random(seed), []
    with torch.no_grad():
        for _ in range(micro_batches):
            batch = make_batch(recipe.sample(rng, size), tokenizer.pad_token_id)
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            mask = batch["loss_mask"][:, 1:]
            nll = F.cross_entropy(logits[:, :-1][mask].double(), batch["input_ids"][:, 1:][mask], reduction="sum")
            sums.append((float(nll), int(mask.sum())))
    return sums


@pytest.mark.parametrize("normalisation", ["step", "micro-batch"])
def test_the_first_logged_loss_is_the_definition(world, tokenizer, tmp_path, normalisation):
    recipe = SFTRecipe(tokenizer, rows(world))
    model = tiny_random_model(vocab_size=len(tokenizer), seed=3)
    sums = token_sums(model, tokenizer, recipe, 0, 3, 2)
    assert len({count for _, count in sums}) > 1  # the two definitions differ on this data
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums) if normalisation == "step" else \
        sum(s / n for s, n in sums) / len(sums)
    config = TrainerConfig(output_dir=str(tmp_path), steps=1, batch_size=2, grad_accum=3, lr=1e-3, progress=False,
                           loss_normalisation=normalisation)
    first = Trainer(model, tokenizer, recipe, config).train()[0]
    assert first["loss"] == pytest.approx(expected, abs=2e-6)


def test_step_normalisation_is_refused_for_a_recipe_without_token_sums(world, tokenizer, tmp_path):
    class Whole:  # a recipe without token_normalised (like the [CLS] and AutoRAP ones)
        name = "whole"

        def longest(self):
            return 1, "row 1"

    with pytest.raises(InputError, match="no per-token loss to normalise over the step"):
        Trainer(tiny_random_model(vocab_size=len(tokenizer)), tokenizer, Whole(),
                TrainerConfig(output_dir=str(tmp_path), steps=1, loss_normalisation="step"))
    with pytest.raises(InputError, match="loss_normalisation must be one of micro-batch, step"):
        TrainerConfig(output_dir=str(tmp_path), steps=1, loss_normalisation="token")


@pytest.mark.parametrize("recipe, given, expected", [
    ("presto", None, "step"), ("da", None, "micro-batch"), ("sft", None, "micro-batch"),
    ("constrained", None, "micro-batch"), ("presto", "micro-batch", "micro-batch"), ("da", "step", "step")])
def test_the_command_line_defaults_follow_each_recipe_s_authors(tmp_path, recipe, given, expected):
    argv = ["train", "--recipe", recipe, "--model", str(tmp_path), "--output", str(tmp_path / "out")]
    args = build_parser().parse_args(argv + (["--loss-normalisation", given] if given else []))
    assert trainer_config(args).loss_normalisation == expected
