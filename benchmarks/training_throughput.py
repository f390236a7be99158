"""Benchmark a training step: PRESTO with the fused attention (the prefill mass from deepalign's
kernel) against plain DA on PyTorch's SDPA without PRESTO, same model, same batches.

    python -m benchmarks.training_throughput           # the world model and SmolLM2-135M
    python -m benchmarks.training_throughput --quick   # the world model only

A step is what the trainer does once: the recipe's loss on one micro-batch, backward, gradient
clipping and an AdamW step. Both providers train on the same micro-batches (the synthetic world's DA
data, 20 % safety examples with their random harmful prefills, drawn with one seed; SmolLM2 gets the
same texts through its own chat template):

* ``presto-fused``: ``attn_implementation="deepalign"``, DA + PRESTO (weight 1, mean over layers);
  on a GPU the Triton kernel, on a CPU its PyTorch reference path;
* ``da-sdpa``: ``attn_implementation="sdpa"``, DA only.

Each (model, provider) runs in its own process, so that its peak memory is its own: peak resident
memory of the process (CPU, ``ru_maxrss``, which includes the model and the Python runtime) or
``torch.cuda.max_memory_allocated`` (GPU). Rows: median ms per step over 5 steps after 2 warm-up
steps, tokens per second (non-padding tokens of the batch / step time), peak memory in MiB, the
machine's 1-minute load average at the end, and PRESTO's time relative to DA's.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import bench_main, device_name

BATCH_SIZE = 16
PROVIDERS = {"presto-fused": ("deepalign", 1.0), "da-sdpa": ("sdpa", 0.0)}


def _model_and_tokenizer(model_name: str, attention: str, device: torch.device):
    from deepalign.data.synthetic import SyntheticWorld

    if attention == "deepalign":
        from deepalign.models.attention import register_attention

        register_attention()
    if model_name == "world":
        from deepalign.models.loading import tiny_random_model

        tokenizer = SyntheticWorld.build(0).tokenizer()
        model = tiny_random_model("llama", vocab_size=len(tokenizer), hidden_size=128, layers=4, heads=4, kv_heads=2,
                                  head_dim=32, max_positions=256, attn_implementation=attention,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    else:
        from deepalign.models.loading import load_pretrained, smollm2_path

        model, tokenizer = load_pretrained(smollm2_path(), attn_implementation=attention, dtype="float32")
    return model.to(device).train(), tokenizer


def _recipe(tokenizer, presto_weight: float):
    from deepalign.data.rows import SafetyExample, UtilityExample
    from deepalign.data.synthetic import SyntheticWorld
    from deepalign.training.recipes import DARecipe

    world = SyntheticWorld.build(0)
    safety = [SafetyExample(world.request(i, p), world.compliant_response(i), world.refusal(i, p))
              for i in world.harmful_items() for p in range(2)]
    utility = [UtilityExample(world.request(i, p), world.compliant_response(i))
               for i in world.benign_items() for p in range(2)]
    return DARecipe(tokenizer, safety, utility, presto_weight=presto_weight)


def measure(model_name: str, provider: str) -> dict:
    """One (model, provider) in this process: the row's measured fields."""
    from deepalign.training.recipes import make_batch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attention, presto_weight = PROVIDERS[provider]
    model, tokenizer = _model_and_tokenizer(model_name, attention, device)
    recipe = _recipe(tokenizer, presto_weight)
    rng = random.Random(0)
    batches = [make_batch(recipe.sample(rng, BATCH_SIZE), tokenizer.pad_token_id) for _ in range(7)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index, batch in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        recipe.loss_terms(model, batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= 2:
            times.append(time.perf_counter() - started)
    tokens = statistics.median(int(b["attention_mask"].sum()) for b in batches[2:])
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_ms = statistics.median(times) * 1e3
    return {"model": model_name, "provider": provider, "batch_size": BATCH_SIZE, "tokens_per_batch": tokens,
            "ms_per_step": round(step_ms, 2), "tokens_per_s": round(tokens / (step_ms / 1e3), 1),
            "peak_mib": round(peak, 1), "peak_kind": "cuda max allocated" if device.type == "cuda" else "process RSS",
            "device": device_name(device)}


def run(quick: bool) -> list[dict]:
    rows = []
    for model_name in ("world",) if quick else ("world", "smollm2"):
        measured = {}
        for provider in PROVIDERS:
            done = subprocess.run([sys.executable, "-m", "benchmarks.training_throughput", "--measure", model_name,
                                   provider], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{model_name} / {provider} failed:\n{done.stderr[-3000:]}")
            measured[provider] = json.loads(done.stdout.strip().splitlines()[-1])
        for provider, row in measured.items():
            row["vs_da_sdpa"] = round(row["ms_per_step"] / measured["da-sdpa"]["ms_per_step"], 3)
            row["load_average_1min"] = round(os.getloadavg()[0], 2)
            print(f"{model_name:8s} {provider:13s} {row['ms_per_step']:9.1f} ms/step  {row['tokens_per_s']:9.1f} tok/s  "
                  f"peak {row['peak_mib']:8.1f} MiB ({row['peak_kind']})  ×{row['vs_da_sdpa']:.2f} of da-sdpa")
            rows.append(row)
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], sys.argv[3])))
    else:
        bench_main("training_throughput", __doc__, run)
