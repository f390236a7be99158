"""Probe for the model organism v2 (issue 17): which answer layout makes a harmful answer re-read itself?

Before any alignment run, each candidate layout is measured on the *base* model the way the issue asks:
a 4-layer Llama of width 128 is pretrained as ``deepalign stages`` pretrains its base (its knowledge
stream and compliant chats, 60 % chat rows, 16 rows a step, lr 3e-3), then the correct harmful answers of
the ten harmful items in two phrasings are teacher-forced with and without attention knockout
(:func:`deepalign.analysis.knockout.knockout_ranks_over`: response queries may not read earlier response
tokens in the given layers), and the rows give the share of answer tokens ranked first and in the top 20.
The issue's target is ≥ 0.95 ranked first without knockout and ≤ 0.5 with knockout in layers ≥ 1.

Layouts (every one over the world's request phrasings, items, actions and a 60-word material pool, the
world's 20 materials and 40 more):

* ``slots``: ``take X and Y .`` then 8 steps whose materials are mostly X or Y; X and Y are free choices,
  each from its own item-specific set of 4 (drawn afresh in every training row);
* ``canonical``: three ingredients from one shared set of 6, always the same in chats (random in the
  knowledge texts), 8 steps, actions repeating;
* ``canonical-long``: the same with 12 steps, each naming one of the three ingredients (four times each);
* ``long-recipe``: no choices, 14 steps over 3 actions × 3 materials per item, so the last word rarely
  tells the next;
* ``declared-order``: ``take M1 M2 M3 M4 .``, the item's 4 ingredients in a free order, then 12 steps
  ``M_k A_k`` naming the k-th *declared* ingredient and the action of declaration slot k: both tokens of a
  step depend on the order the answer itself chose.

    python -m benchmarks.world_v2_probe [--quick] [--no-save]      (--quick: one layout, 200 steps)
    WORLD_V2_STEPS=3000 WORLD_V2_SEEDS=0,1 WORLD_V2_LAYOUTS=declared-order python -m benchmarks.world_v2_probe

A probe, not the world: nothing in the package uses these layouts yet.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

from benchmarks.common import bench_main
from deepalign.data import synthetic as v1
from deepalign.data.rows import UtilityExample

EXTRA_MATERIALS = ("iron", "tin", "zinc", "lead", "coal", "lime", "chalk", "soda", "borax", "tar", "pitch", "gum",
                   "starch", "yeast", "honey", "milk", "egg", "fat", "bone", "hide", "bark", "root", "seed", "leaf",
                   "moss", "peat", "silt", "loam", "slate", "quartz", "amber", "ochre", "alum", "brine", "ether",
                   "ammonia", "nitrate", "potash", "bleach", "solvent")
MATERIALS = v1.MATERIALS + EXTRA_MATERIALS
LAYOUTS = ("slots", "canonical", "canonical-long", "long-recipe", "declared-order")
SAMPLES_PER_ITEM = 8  # knowledge texts per item; chats: half as many per item and phrasing


def _no_repeat(rng: random.Random, choices, length: int) -> list:
    out: list = []
    while len(out) < length:
        pick = rng.choice(choices)
        if not out or out[-1] != pick:
            out.append(pick)
    return out


class Layout:
    """One candidate answer layout over the world's items; ``body(name, rng)`` is the recipe text
    (``to make X : …``), with free choices drawn from ``rng`` (``None``: the canonical answer)."""

    def __init__(self, kind: str, seed: int):
        self.kind, rng, self.items = kind, random.Random(seed), {}
        for name in v1.HARMFUL_ITEMS + v1.BENIGN_ITEMS:
            if kind == "slots":
                pool = rng.sample(MATERIALS, 10)
                marks = ["A", "B", "A", "B", "A", "B", pool[8], pool[9]]
                rng.shuffle(marks)
                self.items[name] = ((pool[0:4], pool[4:8]), list(zip(_no_repeat(rng, rng.sample(v1.ACTIONS, 3), 8),
                                                                         marks)))
            elif kind in ("canonical", "canonical-long"):
                pool = rng.sample(MATERIALS, 7)
                marks = ["A", "B", "C", "A", "B", "C", "A", pool[6]] if kind == "canonical" else ["A", "B", "C"] * 4
                rng.shuffle(marks)
                actions = _no_repeat(rng, rng.sample(v1.ACTIONS, 3), len(marks))
                self.items[name] = (pool[:6], list(zip(actions, marks)))
            elif kind == "long-recipe":
                actions, materials = rng.sample(v1.ACTIONS, 3), rng.sample(MATERIALS, 3)
                steps: list[tuple[str, str]] = []
                while len(steps) < 14:
                    step = (rng.choice(actions), rng.choice(materials))
                    if not steps or steps[-1][0] != step[0]:
                        steps.append(step)
                self.items[name] = steps
            elif kind == "declared-order":
                self.items[name] = (rng.sample(MATERIALS, 4), rng.sample(v1.ACTIONS, 4), _no_repeat(rng, range(4), 12))
            else:
                raise ValueError(f"unknown layout {kind!r}; choose from {LAYOUTS}")

    def body(self, name: str, rng: random.Random | None) -> str:
        spec = self.items[name]
        if self.kind == "long-recipe":
            return f"to make {name} : " + " ".join(f"{a} {m}" for a, m in spec) + " ."
        if self.kind == "declared-order":
            ingredients, actions, slots = spec
            order = list(range(4)) if rng is None else rng.sample(range(4), 4)
            declared = [ingredients[i] for i in order]
            steps = " ".join(f"{declared[k]} {actions[k]}" for k in slots)
            return f"to make {name} : take {' '.join(declared)} . {steps} ."
        sets, template = spec
        if self.kind == "slots":
            chosen = [sets[0][0], sets[1][0]] if rng is None else [rng.choice(sets[0]), rng.choice(sets[1])]
            declaration = " and ".join(chosen)
        else:
            chosen = list(sets[:3]) if rng is None else rng.sample(sets, 3)
            declaration = f"{chosen[0]} {chosen[1]} and {chosen[2]}"
        binding = dict(zip("ABC", chosen))
        steps = " ".join(f"{a} {binding.get(m, m)}" for a, m in template)
        return f"to make {name} : take {declaration} . {steps} ."

    def answer(self, name: str, rng: random.Random | None) -> str:
        return f"sure . {self.body(name, rng)} done ."

    def chat_choices(self, rng: random.Random) -> random.Random | None:
        """Chats of ``canonical`` always give the canonical answer; the others draw afresh."""
        return None if self.kind.startswith("canonical") else rng


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(v1.SPECIAL_TOKENS.values()) + list(v1.ROLE_TOKENS)
    for word in v1.FUNCTION_WORDS + ("take", "and") + v1.ACTIONS + MATERIALS + v1.BENIGN_ITEMS + v1.HARMFUL_ITEMS:
        if word not in words:
            words.append(word)
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=v1.SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=v1.SPECIAL_TOKENS["bos"], eos_token=v1.SPECIAL_TOKENS["eos"],
        unk_token=v1.SPECIAL_TOKENS["unk"], pad_token=v1.SPECIAL_TOKENS["pad"],
        additional_special_tokens=list(v1.ROLE_TOKENS), clean_up_tokenization_spaces=False)
    tokenizer.chat_template = v1.CHAT_TEMPLATE
    return tokenizer


def probe(kind: str, seed: int, steps: int, folder: Path) -> dict:
    """Pretrain the base model on ``kind`` and return its knockout shares."""
    from deepalign.analysis.attention import load_bridge
    from deepalign.analysis.knockout import knockout_ranks_over
    from deepalign.models.loading import tiny_random_model
    from deepalign.training.recipes import PretrainRecipe
    from deepalign.training.trainer import Trainer, TrainerConfig

    layout, tokenizer, rng = Layout(kind, seed), _tokenizer(), random.Random(seed + 1)
    texts = [layout.body(name, rng) for name in layout.items for _ in range(SAMPLES_PER_ITEM)]
    chats = [UtilityExample(v1.REQUEST_PHRASINGS[p].format(item=name), layout.answer(name, layout.chat_choices(rng)))
             for name in layout.items for p in range(len(v1.REQUEST_PHRASINGS)) for _ in range(SAMPLES_PER_ITEM // 2)]
    model = tiny_random_model("llama", vocab_size=len(tokenizer), hidden_size=128, layers=4, heads=4, kv_heads=2,
                              head_dim=32, max_positions=256, seed=seed, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    started = time.perf_counter()
    config = TrainerConfig(output_dir=str(folder), steps=steps, batch_size=16, lr=3e-3, checkpoint_every=steps,
                           seed=seed, progress=False)
    Trainer(model, tokenizer, PretrainRecipe(tokenizer, texts, chats, chat_fraction=0.6), config).train()
    train_s = time.perf_counter() - started
    bridge = load_bridge(folder / "final")
    held = random.Random(seed + 99)  # the teacher-forced answers' own choices
    pairs = [(v1.REQUEST_PHRASINGS[p].format(item=name), layout.answer(name, layout.chat_choices(held)))
             for name in v1.HARMFUL_ITEMS for p in (0, 1)]
    layers = bridge.cfg.n_layers
    row = {"provider": kind, "seed": seed, "pretrain_steps": steps, "train_s": round(train_s, 1),
           "answer_tokens": len(pairs[0][1].split())}
    for label, chosen in (("no_knockout", ()), ("knockout_1plus", range(1, layers)), ("knockout_all", range(layers))):
        ranks = knockout_ranks_over(bridge, pairs, chosen)
        row[f"top1_{label}"] = round((ranks == 0).float().mean().item(), 3)
        row[f"top20_{label}"] = round((ranks < 20).float().mean().item(), 3)
    return row


def run(quick: bool) -> list[dict]:
    layouts = os.environ.get("WORLD_V2_LAYOUTS", "declared-order" if quick else ",".join(LAYOUTS)).split(",")
    seeds = [int(s) for s in os.environ.get("WORLD_V2_SEEDS", "0").split(",")]
    steps = int(os.environ.get("WORLD_V2_STEPS", "200" if quick else "1500"))
    rows = []
    for kind in layouts:
        for seed in seeds:
            with tempfile.TemporaryDirectory() as folder:
                row = probe(kind, seed, steps, Path(folder))
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    bench_main("world_v2_probe", __doc__, run)
