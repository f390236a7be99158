"""Benchmark ``prefill_attention`` (out + mass, and both gradients) against the alternatives.

    python -m benchmarks.prefill_attention            # full grid on a GPU; a small grid on the CPU
    python -m benchmarks.prefill_attention --quick    # two shapes, for smoke tests

Providers (causal attention; the prefill is a span of keys in the middle of each sequence):
* ``deepalign``: the fused kernel, returning out and mass; backward takes gradients on both;
* ``sdpa-flash``: ``scaled_dot_product_attention`` with the flash backend (GPU) — computes no mass,
  the speed to match;
* ``eager``: materialised probabilities, then ``mass = Σ_j P_ij m_j`` (what PRESTO's released code
  does with ``output_attentions=True``);
* ``flex``: FlexAttention (compiled) twice, the second call restricted to prefill keys, and
  ``mass = exp(lse_prefill − lse_all)`` (GPU only).

Grid: T ∈ {512, 1024, 2048, 4096, 8192}, D ∈ {64, 128}, bf16, batch · heads chosen so that
B · T = 16k tokens and Hq · D = 2048 (GQA 4:1). TFLOP/s follow FlashAttention's convention
(forward 4·B·H·T²·D, halved for causal; forward + backward 3.5× the forward). Peak memory is
``torch.cuda.max_memory_allocated`` above the inputs. On the CPU the grid is small, float32, and
``deepalign`` is the PyTorch reference (the CPU training path).
Targets (H100, benchmark not test): fwd+bwd ≥ 0.9× SDPA-flash throughput at T ≥ 2048, D = 128;
≥ 5× faster and ≥ 10× less peak memory than eager at T = 4096.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import bench_main, device_name, median_ms
from deepalign.kernels import prefill_attention


def make_inputs(batch, heads_q, heads_kv, length, dim, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen).requires_grad_()

    q, k, v = rand(batch, heads_q, length, dim), rand(batch, heads_kv, length, dim), rand(batch, heads_kv, length, dim)
    prefill = torch.zeros(batch, length, dtype=torch.bool, device=device)
    prefill[:, length // 4: length // 2] = True
    return q, k, v, prefill


def deepalign_fn(q, k, v, prefill):
    return prefill_attention(q, k, v, prefill)


def sdpa_fn(q, k, v, prefill):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), None


def eager_fn(q, k, v, prefill):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")).float(), dim=-1)
    out = probs.to(v.dtype) @ v
    return out, (probs * prefill[:, None, None, :]).sum(-1)


def flex_fn_factory():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    cache = {}

    def fn(q, k, v, prefill):
        key = (q.shape, prefill.data_ptr())
        if key not in cache:
            def causal(b, h, i, j):
                return j <= i

            def causal_prefill(b, h, i, j):
                return (j <= i) & prefill[b, j]

            length = q.shape[2]
            cache[key] = (create_block_mask(causal, q.shape[0], None, length, length, device=q.device),
                          create_block_mask(causal_prefill, q.shape[0], None, length, length, device=q.device))
        all_mask, prefill_mask = cache[key]
        out, lse_all = compiled(q, k, v, block_mask=all_mask, enable_gqa=True, return_lse=True)
        _, lse_prefill = compiled(q, k, v, block_mask=prefill_mask, enable_gqa=True, return_lse=True)
        return out, torch.exp(lse_prefill - lse_all).nan_to_num(0.0)

    return fn


def timed(fn: Callable, inputs, backward: bool, device) -> tuple[float, float | None]:
    q, k, v, prefill = inputs

    def run():
        out, mass = fn(q, k, v, prefill)
        if backward:
            loss = out.float().sum() + (mass.sum() if mass is not None else 0.0)
            torch.autograd.grad(loss, (q, k, v))

    peak = None
    if device.type == "cuda":
        run()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return median_ms(run, device), peak


def run(quick: bool) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if on_gpu:
        lengths, dims, dtype, tokens, width = [512, 1024, 2048, 4096, 8192], [64, 128], torch.bfloat16, 16384, 2048
        if quick:
            lengths, dims = [1024], [128]
    else:
        lengths, dims, dtype, tokens, width = [256, 512], [64], torch.float32, 1024, 256
        if quick:
            lengths = [256]
    providers = {"deepalign": deepalign_fn, "sdpa-flash" if on_gpu else "sdpa": sdpa_fn, "eager": eager_fn}
    if on_gpu:
        providers["flex"] = flex_fn_factory()
    name = device_name(device)
    rows = []
    for dim in dims:
        for length in lengths:
            batch, heads_q = max(1, tokens // length), width // dim
            heads_kv = max(1, heads_q // 4)
            inputs = make_inputs(batch, heads_q, heads_kv, length, dim, dtype, device)
            fwd_flops = 4 * batch * heads_q * length * length * dim / 2
            for mode, backward, flops in (("fwd", False, fwd_flops), ("fwd+bwd", True, 3.5 * fwd_flops)):
                for provider, fn in providers.items():
                    try:
                        ms, peak = timed(fn, inputs, backward, device)
                    except (RuntimeError, torch.OutOfMemoryError) as error:  # e.g. eager out of memory at 8k
                        print(f"{provider} {mode} T={length} D={dim}: skipped ({str(error).splitlines()[0][:80]})")
                        if on_gpu:
                            torch.cuda.empty_cache()
                        continue
                    row = {"provider": provider, "mode": mode, "B": batch, "Hq": heads_q, "Hkv": heads_kv,
                           "T": length, "D": dim, "dtype": str(dtype).removeprefix("torch."), "causal": True,
                           "median_ms": round(ms, 4), "TFLOP/s": round(flops / (ms * 1e-3) / 1e12, 3),
                           "peak_MiB": None if peak is None else round(peak, 1), "device": name}
                    rows.append(row)
                    print(f"{mode:>8} T={length:>5} D={dim:>3} {provider:>10}: {ms:9.3f} ms "
                          f"{row['TFLOP/s']:8.3f} TFLOP/s" + (f" peak {peak:9.1f} MiB" if peak is not None else ""))
    return rows


def main() -> None:
    bench_main("prefill_attention", __doc__, run)


if __name__ == "__main__":
    main()
