"""``deepalign selfcheck``: the fused kernels on fresh random inputs against their PyTorch
references and a float64 computation, on a GPU when there is one, else in Triton's CPU interpreter.

:func:`run_selfcheck` prints one table per kernel (``topk_rank``: order, ranks, logsumexp error;
``prefill_attention``: the max error of out, mass, dq, dk, dv) and returns the number of failures.
"""

from __future__ import annotations

import os
import time
import warnings

import torch


def run_selfcheck(seed: int = 0) -> int:
    """Run every check, print a table per kernel; returns the number of failed checks."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Triton decides at import time whether it interprets; the kernel modules load lazily.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # The interpreter evaluates masked-out lanes in numpy too (log(0), -inf − -inf): noise.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
    from deepalign.kernels import topk_rank

    generator = torch.Generator().manual_seed(seed)
    where = "GPU" if device.type == "cuda" else "Triton interpreter on the CPU"
    print(f"deepalign selfcheck: topk_rank, Triton ({where}) vs PyTorch reference vs float64")
    print(f"{'rows':>5} {'vocab':>7} {'k':>3} {'dtype':>9} {'order':>6} {'ranks':>6} {'max |Δlse|':>11} {'time s':>7}")
    failures = 0
    for n_rows, vocab, k, dtype in [(4, 1000, 5, torch.float32), (3, 5003, 20, torch.float16),
                                    (2, 8192, 64, torch.float32)]:
        logits = (torch.randn(n_rows, vocab, generator=generator) * 3).to(dtype)
        logits[0, : vocab // 3] = float("-inf")  # a masked vocabulary slice
        logits[-1, 1::7] = logits[-1, 0]  # ties, broken by lower index
        targets = torch.randint(0, vocab, (n_rows, 3), generator=generator)
        logits, targets = logits.to(device), targets.to(device)
        start = time.perf_counter()
        fused = topk_rank(logits, k, targets, backend="triton")
        elapsed = time.perf_counter() - start
        reference = topk_rank(logits.cpu(), k, targets.cpu(), backend="torch")
        order_ok = torch.equal(fused.indices.cpu(), reference.indices) and torch.equal(
            fused.values.cpu(), reference.values)
        ranks_ok = torch.equal(fused.target_rank.cpu(), reference.target_rank)
        exact_lse = torch.logsumexp(logits.cpu().double(), dim=1)
        lse_error = (fused.logsumexp.cpu().double() - exact_lse).abs().max().item()
        ok = order_ok and ranks_ok and lse_error < 1e-4 * (1 + exact_lse.abs().max().item())
        failures += not ok
        print(f"{n_rows:>5} {vocab:>7} {k:>3} {str(dtype).removeprefix('torch.'):>9} "
              f"{'ok' if order_ok else 'FAIL':>6} {'ok' if ranks_ok else 'FAIL':>6} {lse_error:>11.2e} {elapsed:>7.2f}")
    failures += _check_prefill_attention(device, generator, where)
    print("all checks passed" if not failures else f"{failures} check(s) FAILED")
    return failures


def _check_prefill_attention(device: torch.device, generator: torch.Generator, where: str) -> int:
    """prefill_attention (out, mass and the three gradients), Triton vs float64; returns failures."""
    from deepalign.kernels import prefill_attention
    from deepalign.kernels.attention import AttentionMask, prefill_attention_reference

    print(f"\nprefill_attention, Triton ({where}) vs float64 (max |error| / max(1, max |exact|) of out, mass, dq, dk, dv)")
    failures = 0
    # On a GPU the precisions users train in: bfloat16, and float32 on TF32 tensor cores (the
    # default); the interpreter computes IEEE float32. Tolerances are absolute, for unit-variance
    # inputs: a few ulps of each precision times the reduction lengths here.
    if device.type == "cuda":
        dtypes = [(torch.bfloat16, 5e-2), (torch.float32, 1e-2)]
    else:
        dtypes = [(torch.float32, 1e-4)]
    cases = [(2, 4, 2, 48, 64, {}), (1, 4, 1, 40, 128, dict(window=16, softcap=30.0))]
    for (batch, heads_q, heads_kv, length, dim, options), (dtype, tolerance) in (
            (case, d) for d in dtypes for case in cases):
        def rand(*shape):
            return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()

        q, k, v = rand(batch, heads_q, length, dim), rand(batch, heads_kv, length, dim), rand(batch, heads_kv, length, dim)
        prefill = torch.zeros(batch, length, dtype=torch.bool, device=device)
        prefill[:, length // 3: length // 2] = True
        spec = AttentionMask(True, options.get("window"), options.get("softcap"), dim ** -0.5)
        start = time.perf_counter()
        out, mass = prefill_attention(q, k, v, prefill, backend="triton", **options)
        got = [out, mass, *torch.autograd.grad(out.sum() + mass.sum(), (q, k, v))]
        elapsed = time.perf_counter() - start
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        out, mass = prefill_attention_reference(q64, k64, v64, prefill, None, spec)
        exact = [out, mass, *torch.autograd.grad(out.sum() + mass.sum(), (q64, k64, v64))]
        # Error relative to the largest exact entry (at least 1) of each output.
        errors = [(a.double() - b).abs().max().item() / max(1.0, b.abs().max().item()) for a, b in zip(got, exact)]
        ok = max(errors) < tolerance
        failures += not ok
        print(f"  {str(dtype).removeprefix('torch.')} B={batch} Hq={heads_q} Hkv={heads_kv} T={length} D={dim} "
              f"{options or ''}: "
              + " ".join(f"{e:.1e}" for e in errors) + f"  {'ok' if ok else 'FAIL'}  {elapsed:.2f} s")
    return failures
