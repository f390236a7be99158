"""A PRESTO run on the synthetic world for the multi-process tests: run with ``python`` (one
process) or under ``accelerate launch --cpu --num_processes N`` (DDP over gloo), e.g.

    python tests/training/multiprocess_driver.py OUTPUT --batch-size 4 --normalisation step

``--interrupt-after K`` raises after K loss computations on every process (an interrupted run);
rerunning the same command without it resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse

from deepalign.data.rows import SafetyExample, UtilityExample
from deepalign.data.synthetic import SyntheticWorld
from deepalign.models.loading import tiny_random_model
from deepalign.training.recipes import DARecipe
from deepalign.training.trainer import Trainer, TrainerConfig


class Interrupted(Exception):
    pass


class InterruptAfter:
    """``recipe``, raising after ``calls`` loss computations."""

    def __init__(self, recipe, calls: int):
        self.recipe, self.calls, self.name = recipe, calls, recipe.name
        self.token_normalised = getattr(recipe, "token_normalised", False)

    def sample(self, rng, batch_size):
        return self.recipe.sample(rng, batch_size)

    def longest(self):
        return self.recipe.longest()

    def loss_terms(self, model, batch, **normaliser):
        self.calls -= 1
        if self.calls < 0:
            raise Interrupted
        return self.recipe.loss_terms(model, batch, **normaliser)


def run(output: str, *, batch_size: int, normalisation: str, grad_accum: int = 1, steps: int = 4,
        interrupt_after: int | None = None) -> None:
    """Train (or resume) the run in ``output``; ``batch_size`` is per process."""
    world = SyntheticWorld.build(0)
    tokenizer = world.tokenizer()
    safety = [SafetyExample(world.request(i, p), world.compliant_response(i), world.refusal(i, p))
              for i in world.harmful_items() for p in range(2)]
    utility = [UtilityExample(world.request(i, p), world.compliant_response(i))
               for i in world.benign_items() for p in range(2)]
    recipe = DARecipe(tokenizer, safety, utility, safety_fraction=0.5, presto_weight=1.0)
    if interrupt_after is not None:
        recipe = InterruptAfter(recipe, interrupt_after)
    model = tiny_random_model(vocab_size=len(tokenizer), seed=0, attn_implementation="deepalign")
    config = TrainerConfig(output_dir=output, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3,
                           checkpoint_every=2, progress=False, device="cpu", loss_normalisation=normalisation)
    Trainer(model, tokenizer, recipe, config).train()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--batch-size", type=int, required=True, help="per process")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--normalisation", choices=("step", "micro-batch"), required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--interrupt-after", type=int)
    args = parser.parse_args()
    run(args.output, batch_size=args.batch_size, normalisation=args.normalisation, grad_accum=args.grad_accum,
        steps=args.steps, interrupt_after=args.interrupt_after)


if __name__ == "__main__":
    main()
