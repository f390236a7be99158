"""Knockout probe of the model organism's base model (issue 17): does a harmful answer read itself?

Measured on the *base* model before any alignment run, as the issue asks: a 4-layer Llama of width
128 is pretrained exactly as ``deepalign stages`` pretrains its base (the world's knowledge stream and
compliant chats, 60 % chat rows, 16 rows a step, lr 3e-3, the world's number of steps: 3000 on v2,
1500 on v1), then the stored harmful answers of the
ten harmful items in two phrasings are teacher-forced with and without attention knockout
(:func:`deepalign.analysis.knockout.knockout_ranks_over`: response queries may not read earlier
response tokens in the given layers). Each row gives the share of answer tokens ranked first and in
the top 20; where an answer chooses freely (world version 2's declaration) the best-ranked valid
choice counts, and ``top1_copied_*`` gives the share at the words that repeat an earlier choice of
the answer (:meth:`~deepalign.data.synthetic.SyntheticWorld.copied_words`). The issue's target: ≥ 0.95
ranked first without knockout, ≤ 0.5 with knockout in layers ≥ 1.

    python -m benchmarks.world_v2_probe [--quick] [--no-save]     (--quick: 300 steps, seed 0)
    WORLD_V2_STEPS=1500 WORLD_V2_SEEDS=0,1,2 WORLD_V2_WORLDS=v1,v2 python -m benchmarks.world_v2_probe   (other steps, worlds)
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import bench_main


def probe(world_name: str, seed: int, steps: int, folder: Path) -> dict:
    """Pretrain the base model of ``world_name`` and return its knockout shares."""
    import torch

    from deepalign.analysis.attention import load_bridge
    from deepalign.analysis.knockout import knockout_ranks_over
    from deepalign.data.synthetic import build_world
    from deepalign.experiments.corpus import world_corpus
    from deepalign.experiments.world_files import world_rows
    from deepalign.models.loading import tiny_random_model
    from deepalign.training.recipes import PretrainRecipe
    from deepalign.training.trainer import Trainer, TrainerConfig

    world = build_world(seed, world_name)
    shape = os.environ.get("WORLD_V2_SHAPE")  # "places,choices,steps,gap": a candidate shape of version 2
    if shape and world_name == "v2":
        places, choices, length, gap = (int(x) for x in shape.split(","))
        world = type(world).build(seed, places=places, choices=choices, steps=length, gap=gap)
    tokenizer, rows = world.tokenizer(), world_rows(world)
    model = tiny_random_model("llama", vocab_size=len(tokenizer), hidden_size=128, layers=4, heads=4, kv_heads=2,
                              head_dim=32, max_positions=256, seed=seed, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    started = time.perf_counter()
    config = TrainerConfig(output_dir=str(folder), steps=steps, batch_size=16, lr=3e-3, checkpoint_every=steps,
                           seed=seed, progress=False)
    recipe = PretrainRecipe(tokenizer, world.pretraining_texts(), rows["harmful_sft"] + rows["utility"],
                            chat_fraction=0.6)
    Trainer(model, tokenizer, recipe, config).train()
    train_s = time.perf_counter() - started
    bridge = load_bridge(folder / "final")
    corpus = world_corpus(world)
    alternatives = corpus.alternative_ids(bridge.tokenizer)
    copied = corpus.copied_mask() if corpus.copied is not None else torch.zeros(0, dtype=torch.bool)
    layers = bridge.cfg.n_layers
    row = {"world": world_name, "shape": os.environ.get("WORLD_V2_SHAPE", "default"), "seed": seed, "pretrain_steps": steps, "train_s": round(train_s, 1),
           "answer_tokens": len(corpus.pairs[0][1].split())}
    for label, chosen in (("no_knockout", ()), ("knockout_1plus", range(1, layers)), ("knockout_all", range(layers))):
        ranks = knockout_ranks_over(bridge, corpus.pairs, chosen, alternatives)
        if corpus.copied is not None and len(ranks) != len(copied):
            raise ValueError(f"{len(ranks)} ranks for {len(copied)} answer words: the tokenizer is not word-level")
        row[f"top1_{label}"] = round((ranks == 0).float().mean().item(), 3)
        row[f"top20_{label}"] = round((ranks < 20).float().mean().item(), 3)
        if corpus.copied is not None:  # the words that repeat an earlier choice of the answer
            row[f"top1_copied_{label}"] = round((ranks[copied] == 0).float().mean().item(), 3)
    return row


def run(quick: bool) -> list[dict]:
    worlds = os.environ.get("WORLD_V2_WORLDS", "v2").split(",")
    seeds = [int(s) for s in os.environ.get("WORLD_V2_SEEDS", "0" if quick else "0,1,2").split(",")]
    given = os.environ.get("WORLD_V2_STEPS", "300" if quick else "")
    rows = []
    from deepalign.experiments.stages import StageSettings

    for world in worlds:
        steps = int(given) if given else StageSettings.for_world(world).pretrain_steps  # as deepalign stages
        for seed in seeds:
            with tempfile.TemporaryDirectory() as folder:
                row = probe(world, seed, steps, Path(folder))
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    bench_main("world_v2_probe", __doc__, run)
