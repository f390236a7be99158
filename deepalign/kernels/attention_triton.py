"""Triton forward and backward of :func:`deepalign.kernels.prefill_attention`.

Forward, grid ``(B · Hq, ⌈Tq / BLOCK_M⌉)``: FlashAttention-2 online softmax over key blocks with a
second running sum for the prefill mass (``l_S ← l_S · α + rowsum(p · m)``); writes ``out``,
``mass = l_S / l`` and the row log-sum-exp for backward. Key blocks outside the causal / window
band of the query block are skipped.

Backward: ``Δ_i = rowsum(dO ∘ O)_i + g_i · mass_i`` (``g = ∂L/∂mass``), then two kernels that
recompute ``P = exp(S − lse)`` block by block:

* ``dK, dV``, grid ``(B · Hkv, ⌈Tk / BLOCK_N⌉)``: each program owns a key block and loops over the
  ``Hq / Hkv`` query heads that read it (grouped-query attention without atomics) and their query
  blocks: ``dV += Pᵀ dO``, ``dP = dO Vᵀ + g mᵀ``, ``dS = P ∘ (dP − Δ)``, ``dK += dSᵀ Q``;
* ``dQ``, grid ``(B · Hq, ⌈Tq / BLOCK_M⌉)``: ``dQ += dS K``.

With softcap, ``dS`` is multiplied by ``1 − tanh²`` of the capped score. Accumulation is float32;
float32 inputs use IEEE (not TF32) dot products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepalign.kernels._dispatch import interpreter_enabled
from deepalign.kernels.attention import AttentionMask

# Tests set this to True so outputs start as garbage and an unwritten element shows.
POISON_OUTPUTS = False


@triton.jit
def _tanh(x):
    """tanh to a few ulps from exp/log only (libdevice is unavailable in the interpreter):
    ``tanh|x| = −expm1(−2|x|) / (2 + expm1(−2|x|))`` with Kahan's accurate ``expm1``."""
    y = -2.0 * tl.abs(x)
    u = tl.exp(y)
    em1 = tl.where(u == 1.0, y, (u - 1.0) * y / tl.log(u))
    em1 = tl.where(u == 0.0, -1.0, em1)
    t = -em1 / (2.0 + em1)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(q, k, offs_m, cols, kpad_row_ptr, scale, softcap, window, num_queries, num_keys,
            CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            PRECISION: tl.constexpr):
    """Scaled (and capped) scores of a query block against a key block, and their visibility.
    ``q [BM, BD]``, ``k [BN, BD]``; returns ``(s, visible)``, both ``[BM, BN]``."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if HAS_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    absolute = offs_m[:, None] + (num_keys - num_queries)
    visible = (cols[None, :] < num_keys) & (offs_m[:, None] < num_queries)
    if CAUSAL:
        visible = visible & (cols[None, :] <= absolute)
    if HAS_WINDOW:
        visible = visible & (cols[None, :] > absolute - window)
    if HAS_PAD:
        real = tl.load(kpad_row_ptr + cols, mask=cols < num_keys, other=0)
        visible = visible & (real != 0)[None, :]
    return s, visible


@triton.jit
def _key_range(start_m, num_queries, num_keys, window,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``[lo, hi)`` of key positions that queries ``start_m … start_m + BLOCK_M`` can see, ``lo``
    a multiple of ``BLOCK_N``."""
    lo = 0
    hi = num_keys
    if CAUSAL:
        hi = tl.minimum(num_keys, start_m + BLOCK_M + num_keys - num_queries)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m + num_keys - num_queries - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _load_tile(base, rows, stride, limit, offs_d, d_ok):
    """Rows ``rows`` (``< limit``) of a ``[T, D]`` matrix at ``base`` with row stride ``stride``,
    zero-filled outside; ``[len(rows), BLOCK_D]``."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=(rows < limit)[:, None] & d_ok[None, :],
                   other=0.0)


@triton.jit
def _query_program(heads_q, group, BLOCK_M: tl.constexpr):
    """Indices of a query-block program: ``(start_m, bh, b, h, hk)``. Batch · heads is grid axis 0
    (up to 2³¹ − 1 programs; axis 1 is limited to 65535) and query blocks axis 1."""
    start_m = tl.program_id(1) * BLOCK_M
    bh = tl.program_id(0)
    h = bh % heads_q
    return start_m, bh, bh // heads_q, h, h // group


@triton.jit
def _score_gradient(p, s, do, v, g, prefill, delta, softcap, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """``dS`` for one tile: ``P ∘ (dO Vᵀ + g mᵀ − Δ)``, times ``1 − tanh²`` under a softcap."""
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) + g[:, None] * prefill[None, :]
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        capped = s / softcap
        ds = ds * (1.0 - capped * capped)
    return ds


@triton.jit
def _fwd_kernel(
    Q, K, V, PREFILL, KPAD, OUT, MASS, LSE,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    heads_q, group, num_queries, num_keys, head_dim, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m, bh, b, h, hk = _query_program(heads_q, group, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < num_queries
    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, stride_qt, num_queries,
                   offs_d, d_ok)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    prefill_row = PREFILL + b.to(tl.int64) * num_keys
    kpad_row = KPAD + b.to(tl.int64) * num_keys

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ls_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    lo, hi = _key_range(start_m, num_queries, num_keys, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < num_keys
        k = _load_tile(k_base, cols, stride_kt, num_keys, offs_d, d_ok)
        v = _load_tile(v_base, cols, stride_vt, num_keys, offs_d, d_ok)
        s, visible = _scores(q, k, offs_m, cols, kpad_row, scale, softcap, window, num_queries, num_keys,
                             CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP, PRECISION)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        prefill = tl.load(prefill_row + cols, mask=col_ok, other=0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        ls_i = ls_i * alpha + tl.sum(p * prefill[None, :], axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    mass = ls_i / l_safe
    lse = tl.where(empty, 0.0, tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_safe))
    o_ptrs = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    row_index = bh.to(tl.int64) * num_queries + offs_m
    tl.store(MASS + row_index, mass, mask=row_ok)
    tl.store(LSE + row_index, lse, mask=row_ok)


@triton.jit
def _dkdv_kernel(
    Q, K, V, PREFILL, KPAD, DO, LSE, DELTA, GMASS, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    heads_q, heads_kv, group, num_queries, num_keys, head_dim, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_n = tl.program_id(1) * BLOCK_N
    bhk = tl.program_id(0)
    b = bhk // heads_kv
    hk = bhk % heads_kv
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    col_ok = cols < num_keys
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = _load_tile(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh, cols, stride_kt, num_keys, offs_d, d_ok)
    v = _load_tile(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh, cols, stride_vt, num_keys, offs_d, d_ok)
    prefill = tl.load(PREFILL + b.to(tl.int64) * num_keys + cols, mask=col_ok, other=0).to(tl.float32)
    kpad_row = KPAD + b.to(tl.int64) * num_keys
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    # Queries that can see this key block: causal needs i ≥ j − (Tk − Tq); a window needs
    # i < j + window − (Tk − Tq).
    shift = num_keys - num_queries
    m_lo = 0
    m_hi = num_queries
    if CAUSAL:
        m_lo = tl.maximum(0, start_n - shift)
        m_lo = (m_lo // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        m_hi = tl.minimum(num_queries, start_n + BLOCK_N - 1 + window - shift)
    for hq in range(0, group):
        h = hk * group + hq
        bh = b * heads_q + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < num_queries
            q = _load_tile(q_base, offs_m, stride_qt, num_queries, offs_d, d_ok)
            do = _load_tile(do_base, offs_m, stride_dot, num_queries, offs_d, d_ok)
            row_index = bh.to(tl.int64) * num_queries + offs_m
            lse = tl.load(LSE + row_index, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row_index, mask=row_ok, other=0.0)
            g = tl.load(GMASS + row_index, mask=row_ok, other=0.0)
            s, visible = _scores(q, k, offs_m, cols, kpad_row, scale, softcap, window, num_queries, num_keys,
                                 CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP, PRECISION)
            p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            ds = _score_gradient(p, s, do, v, g, prefill, delta, softcap, HAS_SOFTCAP, PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    out_offsets = bhk.to(tl.int64) * num_keys * head_dim + cols[:, None] * head_dim + offs_d[None, :]
    tl.store(DK + out_offsets, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_kernel(
    Q, K, V, PREFILL, KPAD, DO, LSE, DELTA, GMASS, DQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    heads_q, group, num_queries, num_keys, head_dim, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m, bh, b, h, hk = _query_program(heads_q, group, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < num_queries
    row_mask = row_ok[:, None] & d_ok[None, :]
    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, stride_qt, num_queries,
                   offs_d, d_ok)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, stride_dot, num_queries,
                    offs_d, d_ok)
    row_index = bh.to(tl.int64) * num_queries + offs_m
    lse = tl.load(LSE + row_index, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_index, mask=row_ok, other=0.0)
    g = tl.load(GMASS + row_index, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    prefill_row = PREFILL + b.to(tl.int64) * num_keys
    kpad_row = KPAD + b.to(tl.int64) * num_keys
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    lo, hi = _key_range(start_m, num_queries, num_keys, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < num_keys
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        prefill = tl.load(prefill_row + cols, mask=col_ok, other=0).to(tl.float32)
        s, visible = _scores(q, k, offs_m, cols, kpad_row, scale, softcap, window, num_queries, num_keys,
                             CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP, PRECISION)
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        ds = _score_gradient(p, s, do, v, g, prefill, delta, softcap, HAS_SOFTCAP, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(DQ + bh.to(tl.int64) * num_queries * head_dim + offs_m[:, None] * head_dim + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


def _config(head_dim: int) -> dict:
    """Tile sizes. Small tiles in the interpreter (speed); on a GPU a conservative default that
    fits shared memory up to D = 256 (GPU tuning is recorded in benchmarks/results)."""
    block_d = triton.next_power_of_2(head_dim)
    if interpreter_enabled():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=4)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=2)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=1)


def _flags(spec: AttentionMask, key_padding_mask, dtype) -> dict:
    return dict(CAUSAL=spec.causal, HAS_PAD=key_padding_mask is not None, HAS_WINDOW=spec.window is not None,
                HAS_SOFTCAP=spec.softcap is not None,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _scalars(spec: AttentionMask) -> tuple:
    return spec.scale, spec.softcap or 1.0, spec.window or 0


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def attention_forward(q, k, v, prefill_u8, kpad_u8, spec: AttentionMask):
    """Launch the forward kernel. Returns ``(out, mass, lse)``; ``*_u8`` masks are uint8 ``[B, Tk]``."""
    batch, heads_q, num_queries, head_dim = q.shape
    heads_kv, num_keys = k.shape[1], k.shape[2]
    out = _new(q.shape, q.dtype, q.device)
    mass = _new((batch, heads_q, num_queries), torch.float32, q.device)
    lse = _new((batch, heads_q, num_queries), torch.float32, q.device)
    if num_queries == 0:
        return out, mass, lse
    cfg = _config(head_dim)
    grid = (batch * heads_q, triton.cdiv(num_queries, cfg["BLOCK_M"]))
    _fwd_kernel[grid](
        q, k, v, prefill_u8, kpad_u8 if kpad_u8 is not None else prefill_u8, out, mass, lse,
        *_strides(q, k, v, out), heads_q, heads_q // heads_kv, num_queries, num_keys, head_dim, *_scalars(spec),
        **_flags(spec, kpad_u8, q.dtype), **cfg,
    )
    return out, mass, lse


def attention_backward(q, k, v, prefill_u8, kpad_u8, spec, out, mass, lse, grad_out, grad_mass):
    """Launch the backward kernels. Returns ``(dq, dk, dv)`` (contiguous, dtypes of q, k, v)."""
    batch, heads_q, num_queries, head_dim = q.shape
    heads_kv, num_keys = k.shape[1], k.shape[2]
    grad_out = _unit_last_stride(grad_out)
    delta = (grad_out.float() * out.float()).sum(dim=-1) + grad_mass * mass
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = _new((batch, heads_kv, num_keys, head_dim), k.dtype, k.device)
    dv = _new((batch, heads_kv, num_keys, head_dim), v.dtype, v.device)
    if num_keys == 0 or num_queries == 0:
        return dq, dk.zero_(), dv.zero_()
    if POISON_OUTPUTS:
        dq.fill_(float("nan"))
    cfg = _config(head_dim)
    common = (*_strides(q, k, v, grad_out),)
    flags = _flags(spec, kpad_u8, q.dtype)
    kpad_arg = kpad_u8 if kpad_u8 is not None else prefill_u8
    _dkdv_kernel[(batch * heads_kv, triton.cdiv(num_keys, cfg["BLOCK_N"]))](
        q, k, v, prefill_u8, kpad_arg, grad_out, lse, delta, grad_mass, dk, dv, *common,
        heads_q, heads_kv, heads_q // heads_kv, num_queries, num_keys, head_dim, *_scalars(spec), **flags, **cfg,
    )
    _dq_kernel[(batch * heads_q, triton.cdiv(num_queries, cfg["BLOCK_M"]))](
        q, k, v, prefill_u8, kpad_arg, grad_out, lse, delta, grad_mass, dq, *common,
        heads_q, heads_q // heads_kv, num_queries, num_keys, head_dim, *_scalars(spec), **flags, **cfg,
    )
    return dq, dk, dv


class PrefillAttentionFunction(torch.autograd.Function):
    """``(out, mass) = prefill_attention(q, k, v, ...)`` on the Triton kernels, differentiable in
    ``q, k, v`` through both outputs."""

    @staticmethod
    def forward(ctx, q, k, v, prefill_mask, key_padding_mask, spec: AttentionMask):
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        prefill_u8 = prefill_mask.to(torch.uint8).contiguous()
        kpad_u8 = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
        out, mass, lse = attention_forward(q, k, v, prefill_u8, kpad_u8, spec)
        ctx.save_for_backward(q, k, v, prefill_u8, kpad_u8, out, mass, lse)
        ctx.spec = spec
        return out, mass

    @staticmethod
    def backward(ctx, grad_out, grad_mass):
        q, k, v, prefill_u8, kpad_u8, out, mass, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_mass is None:
            grad_mass = torch.zeros_like(mass)
        dq, dk, dv = attention_backward(q, k, v, prefill_u8, kpad_u8, ctx.spec, out, mass, lse,
                                        grad_out, grad_mass.float().contiguous())
        return dq, dk, dv, None, None, None
