"""Benchmark ``topk_rank`` against the obvious PyTorch composition.

    python -m benchmarks.topk_rank            # full grid on a GPU; a reduced grid on the CPU
    python -m benchmarks.topk_rank --quick    # a few shapes, for smoke tests

Providers:
* ``deepalign``: the fused kernel (Triton on a GPU; on the CPU, the PyTorch reference path, which
  is what CPU users run — Triton's interpreter is a correctness tool and is not timed);
* ``torch``: ``torch.topk`` + ``torch.logsumexp`` + a comparison count for the target's rank
  (``(x > x_t).sum() + ((x == x_t) & (v < t)).sum()``), as a user would write it.

Grid: N ∈ {1, 8, 64, 256}, V ∈ {32k, 128k, 256k}, k = 20, one target per row, float32 and
bfloat16. GB/s counts the logits read once (N·V·bytes). On a GPU each row also carries the
fraction of the device's measured copy bandwidth. Targets (benchmark, not test): at N = 64 and
V ≥ 128k, ≥ 3× faster than the composition and ≥ 70% of copy bandwidth.
"""

from __future__ import annotations

import torch

from benchmarks.common import bench_main, copy_bandwidth_gbps, device_name, median_ms
from deepalign.kernels import topk_rank


def composition(logits: torch.Tensor, k: int, targets: torch.Tensor):
    """What one writes without the fused kernel (ties in topk not resolved by index)."""
    top = torch.topk(logits, k, dim=1)
    lse = torch.logsumexp(logits.float(), dim=1)
    target_logits = logits.gather(1, targets[:, None])
    index = torch.arange(logits.shape[1], device=logits.device)
    rank = (logits > target_logits).sum(1) + ((logits == target_logits) & (index < targets[:, None])).sum(1)
    return top.values, top.indices, lse, rank, target_logits.squeeze(1).float() - lse


def run(quick: bool) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    rows_grid = [1, 8, 64, 256]
    vocab_grid = [32_000, 128_000, 256_000]
    if quick:
        rows_grid, vocab_grid = [1, 8], [32_000]
    elif not on_gpu:
        rows_grid = [1, 8, 64]
    copy_bw = copy_bandwidth_gbps(device) if on_gpu else None
    name = device_name(device)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for vocab in vocab_grid:
            for n_rows in rows_grid:
                logits = torch.randn(n_rows, vocab, device=device, generator=gen).to(dtype)
                targets = torch.randint(0, vocab, (n_rows,), device=device, generator=gen)
                providers = {
                    "deepalign": lambda: topk_rank(logits, 20, targets),
                    "torch": lambda: composition(logits, 20, targets),
                }
                timings = {}
                for provider, fn in providers.items():
                    ms = median_ms(fn, device)
                    timings[provider] = ms
                    gbps = n_rows * vocab * logits.element_size() / (ms * 1e-3) / 1e9
                    row = {"provider": provider, "N": n_rows, "V": vocab, "k": 20,
                           "dtype": str(dtype).removeprefix("torch."), "median_ms": round(ms, 5),
                           "GB/s": round(gbps, 2), "device": name}
                    if copy_bw:
                        row["copy_bw_fraction"] = round(gbps / copy_bw, 4)
                    rows.append(row)
                speedup = timings["torch"] / timings["deepalign"]
                rows[-2]["speedup_vs_torch"] = round(speedup, 3)
                print(f"{str(dtype):>15} V={vocab:>7} N={n_rows:>4}  deepalign {timings['deepalign']:9.3f} ms  "
                      f"torch {timings['torch']:9.3f} ms  speedup {speedup:5.2f}x"
                      + (f"  {rows[-2]['copy_bw_fraction']:.0%} of copy bw" if copy_bw else ""))
    return rows


def main() -> None:
    bench_main("topk_rank", __doc__, run)


if __name__ == "__main__":
    main()
