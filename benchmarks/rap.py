"""Benchmark RAP: batched with a KV cache versus one prompt at a time, recomputing the whole
sequence at every step (both run Algorithm 1 with the synthetic oracle and give the same
selections, which this script checks).

    python -m benchmarks.rap            # batch sizes 1, 4, 16 (and 32 on a GPU)
    python -m benchmarks.rap --quick    # batch 4 only

Models: the DA stage of ``deepalign stages`` in ``runs/stages`` (trained there first if missing,
about a minute on a CPU). Rows: prompts per second for each provider, and the speed-up.
Target (benchmark, not test): ≥ 10× on a CPU at batch 16, ≥ 20× on a GPU at batch 32.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import bench_main, device_name
from deepalign.attacks.rap import RAPConfig, rap_attack, rap_attack_unbatched
from deepalign.attacks.selectors import synthetic_oracle
from deepalign.data.synthetic import SyntheticWorld
from deepalign.models.loading import load_pretrained

STAGES_DIR = Path("runs/stages")


def _model():
    if not (STAGES_DIR / "da" / "final").is_dir():
        from deepalign.experiments.stages import StageSettings, run_stages

        run_stages(STAGES_DIR, StageSettings(progress=False), stages=("base", "da"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_pretrained(STAGES_DIR / "da" / "final", device=device)
    return model, tokenizer, SyntheticWorld.load(STAGES_DIR)


def run(quick: bool) -> list[dict]:
    model, tokenizer, world = _model()
    device = next(model.parameters()).device
    selector = synthetic_oracle(world, tokenizer)
    config = RAPConfig(k=20, max_new_tokens=64)
    prompts_all = [world.request(item, p) for p in range(6) for item in world.harmful_items()]
    sizes = [4] if quick else ([1, 4, 16, 32] if device.type == "cuda" else [1, 4, 16])
    rows = []
    for size in sizes:
        prompts = (prompts_all * (size // len(prompts_all) + 1))[:size]
        prefills = [[] for _ in prompts]
        start = time.perf_counter()
        batched = rap_attack(model, tokenizer, prompts, prefills, selector, config, progress=False)
        batched_s = time.perf_counter() - start
        start = time.perf_counter()
        single = rap_attack_unbatched(model, tokenizer, prompts, prefills, selector, config)
        single_s = time.perf_counter() - start
        same = all(a.tokens == b.tokens for a, b in zip(batched, single))
        steps = sum(r.steps for r in batched)
        for provider, seconds in (("batched-kv-cache", batched_s), ("one-at-a-time-recompute", single_s)):
            rows.append({"provider": provider, "batch": size, "prompts_per_s": round(size / seconds, 3),
                         "seconds": round(seconds, 3), "interactions": steps, "same_selections": same,
                         "device": device_name(device)})
        rows[-2]["speedup"] = round(single_s / batched_s, 2)
        print(f"batch {size:>3}: batched {size / batched_s:8.2f} prompts/s, one at a time {size / single_s:8.2f} "
              f"prompts/s, speed-up {single_s / batched_s:5.2f}x, {steps} steps, same selections: {same}")
    return rows


def main() -> None:
    bench_main("rap", __doc__, run)


if __name__ == "__main__":
    main()
