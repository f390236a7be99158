"""Triton forward and backward of :func:`deepalign.kernels.prefill_attention`.

Forward, grid ``(B · Hq, ⌈Tq / BLOCK_M⌉)``: FlashAttention-2 online softmax over key blocks with a
second running sum for the prefill mass (``l_S ← l_S · α + rowsum(p · m)``); writes ``out``,
``mass = l_S / l`` and the row log-sum-exp for backward. Key blocks outside the causal / window
band of the query block are skipped, and blocks that every query of the tile sees whole (inside the
band, inside the keys, all queries real) run without the visibility mask: each kernel walks its
blocks in three runs — the window's edge, the whole blocks, the causal edge — as FlashAttention
splits its masked and unmasked iterations. With key padding the mask is per key and every block
keeps it (one run).

Backward: ``Δ_i = rowsum(dO ∘ O)_i + g_i · mass_i`` (``g = ∂L/∂mass``), then two kernels that
recompute ``P = exp(S − lse)`` block by block:

* ``dK, dV``, grid ``(B · Hkv, ⌈Tk / BLOCK_N⌉)``: each program owns a key block and loops over the
  ``Hq / Hkv`` query heads that read it (grouped-query attention without atomics) and their query
  blocks: ``dV += Pᵀ dO``, ``dP = dO Vᵀ + g mᵀ``, ``dS = P ∘ (dP − Δ)``, ``dK += dSᵀ Q``;
* ``dQ``, grid ``(B · Hq, ⌈Tq / BLOCK_M⌉)``: ``dQ += dS K``.

With softcap, ``dS`` is multiplied by ``1 − tanh²`` of the capped score. Accumulation is float32.
float32 inputs use TF32 tensor-core dot products on a GPU unless the caller asks for IEEE
(``precision="ieee"``); the interpreter always computes IEEE float32. On a GPU the softcap's tanh
is the hardware ``tanh.approx.f32`` for float16 / bfloat16 inputs and libdevice's ``tanhf`` for
float32; the interpreter uses the exp/log form below.

Launch configurations (tile sizes, warps, stages) are per kernel, architecture, head-dim block and,
for float32, dtype: see :data:`GPU_TILES` and :data:`GPU_TILES_TF32`, chosen with ``python -m benchmarks.compile_check`` so that every variant
compiles with zero register spills. On a GPU, ``triton.autotune`` picks among the listed tiles,
keyed on head dim, mask flags, precision and dtype; the interpreter runs one tile
(:data:`INTERPRETER_TILES`, which tests replace with GPU tiles).

Offsets: every row offset is formed in 64-bit (``rows.to(int64) * stride``) and every per-head
base in 64-bit, so tensors with more than 2³¹ elements, or strides whose products pass 2³¹, are
addressed correctly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepalign.kernels._dispatch import interpreter_enabled
from deepalign.kernels.attention import AttentionMask

# Tests set this to True so outputs start as garbage and an unwritten element shows.
POISON_OUTPUTS = False


@triton.jit
def _tanh_exp(x):
    """tanh to a few ulps from exp/log only (libdevice is unavailable in the interpreter):
    ``tanh|x| = −expm1(−2|x|) / (2 + expm1(−2|x|))`` with Kahan's accurate ``expm1``."""
    y = -2.0 * tl.abs(x)
    u = tl.exp(y)
    em1 = tl.where(u == 1.0, y, (u - 1.0) * y / tl.log(u))
    em1 = tl.where(u == 0.0, -1.0, em1)
    t = -em1 / (2.0 + em1)
    return tl.where(x < 0, -t, t)


@triton.jit
def _tanh(x, TANH: tl.constexpr):
    """``TANH``: ``"exp"`` (interpreter), ``"approx"`` (the GPU's ``tanh.approx.f32``, one MUFU
    instruction, relative error below 2⁻¹⁰·⁹, for half-precision inputs) or ``"libdevice"``
    (``tanhf``, 2 ulp, for float32 inputs)."""
    if TANH == "approx":
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    elif TANH == "libdevice":
        return tl.extra.cuda.libdevice.tanh(x)
    else:
        return _tanh_exp(x)


@triton.jit
def _scores(q, k, scale, softcap, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, TANH: tl.constexpr):
    """Scaled (and capped) scores of a query block against a key block: ``q [BM, BD]``,
    ``k [BN, BD]`` → ``[BM, BN]``."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if HAS_SOFTCAP:
        s = softcap * _tanh(s / softcap, TANH)
    return s


@triton.jit
def _visible(offs_m, cols, kpad_row_ptr, window, num_queries, num_keys,
             CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``[BM, BN]``: which (query, key) pairs of a tile may attend. Query ``i`` sits at absolute
    position ``a = i + Tk − Tq``; key ``j`` is visible when ``j < Tk``, ``i < Tq``, ``j ≤ a`` (causal),
    ``j > a − window`` (window) and key ``j`` is not padding."""
    absolute = offs_m[:, None] + (num_keys - num_queries)
    visible = (cols[None, :] < num_keys) & (offs_m[:, None] < num_queries)
    if CAUSAL:
        visible = visible & (cols[None, :] <= absolute)
    if HAS_WINDOW:
        visible = visible & (cols[None, :] > absolute - window)
    if HAS_PAD:
        real = tl.load(kpad_row_ptr + cols, mask=cols < num_keys, other=0)
        visible = visible & (real != 0)[None, :]
    return visible


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
def _query_range(start_n, num_queries, num_keys, window,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``[m_lo, m_hi)`` of query positions that can see keys ``start_n … start_n + BLOCK_N``, ``m_lo`` a
    multiple of ``BLOCK_M``: causal needs ``i ≥ j − (Tk − Tq)``, a window ``i < j + window − (Tk − Tq)``."""
    shift = num_keys - num_queries
    m_lo = 0
    m_hi = num_queries
    if CAUSAL:
        m_lo = tl.maximum(0, start_n - shift)
        m_lo = (m_lo // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        m_hi = tl.minimum(num_queries, start_n + BLOCK_N - 1 + window - shift)
    return m_lo, m_hi


@triton.jit
def _full_key_blocks(start_m, lo, hi, num_queries, num_keys, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``[full_lo, full_hi)``, on the ``BLOCK_N`` grid of ``lo`` with ``lo ≤ full_lo ≤ full_hi ≤ max(lo, hi)``:
    the key blocks every query of ``start_m … start_m + BLOCK_M`` sees whole, which skip the mask.

    A block ``[j₀, j₀ + BN)`` is whole when it lies inside the keys (``j₀ + BN ≤ Tk``), below the
    causal edge of the block's first query (``j₀ + BN − 1 ≤ start_m + Tk − Tq``) and above the window
    edge of its last (``j₀ > start_m + BM − 1 + Tk − Tq − window``), and all ``BM`` queries exist.
    Without a whole block ``full_lo = full_hi = max(lo, hi)``. (With key padding the kernels do not
    call this: the mask is per key.)"""
    shift = num_keys - num_queries
    last = num_keys
    if CAUSAL:
        last = tl.minimum(last, start_m + shift + 1)
    full_hi = (tl.maximum(last, 0) // BLOCK_N) * BLOCK_N
    full_lo = lo
    if HAS_WINDOW:
        first = tl.maximum(start_m + BLOCK_M + shift - window, 0)
        full_lo = tl.maximum(lo, ((first + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    full_hi = tl.minimum(full_hi, hi)
    some = (full_lo < full_hi) & (start_m + BLOCK_M <= num_queries)
    none = tl.maximum(lo, hi)  # no whole block: the first run covers [lo, hi)
    return tl.where(some, full_lo, none), tl.where(some, full_hi, none)


@triton.jit
def _full_query_blocks(start_n, m_lo, m_hi, num_queries, num_keys, window, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The dK/dV kernel's twin of :func:`_full_key_blocks`: ``[full_lo, full_hi)`` of query blocks
    (on the ``BLOCK_M`` grid of ``m_lo``) that see the whole key block ``start_n … start_n + BN``:
    all keys exist (``start_n + BN ≤ Tk``), all queries exist, the block's first query is causally
    past the last key (``i₀ + Tk − Tq ≥ start_n + BN − 1``), and the window of its last query still
    reaches the first key (``i₀ + BM − 1 + Tk − Tq − window < start_n``)."""
    shift = num_keys - num_queries
    full_lo = m_lo
    if CAUSAL:
        first = tl.maximum(start_n + BLOCK_N - 1 - shift, 0)
        full_lo = tl.maximum(m_lo, ((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    last = num_queries
    if HAS_WINDOW:
        last = tl.minimum(last, start_n + window - shift)
    full_hi = tl.minimum((tl.maximum(last, 0) // BLOCK_M) * BLOCK_M, m_hi)
    some = (full_lo < full_hi) & (start_n + BLOCK_N <= num_keys)
    none = tl.maximum(m_lo, m_hi)
    return tl.where(some, full_lo, none), tl.where(some, full_hi, none)


@triton.jit
def _load_tile(base, rows, stride, limit, offs_d, d_ok):
    """Rows ``rows`` (``< limit``) of a ``[T, D]`` matrix at ``base`` with row stride ``stride``,
    zero-filled outside; ``[len(rows), BLOCK_D]``. The row offset is 64-bit."""
    return tl.load(base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :],
                   mask=(rows < limit)[:, None] & d_ok[None, :], other=0.0)


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
def _fwd_step(acc, m_i, l_i, ls_i, q, k_base, v_base, prefill_row, kpad_row, start_n, offs_m, offs_n, offs_d, d_ok,
              stride_kt, stride_vt, scale, softcap, window, num_queries, num_keys,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, TANH: tl.constexpr):
    """One key block of the online softmax: ``m ← max(m, rowmax S)``, ``α = exp(m_old − m)``,
    ``l ← α·l + rowsum P``, ``l_S ← α·l_S + rowsum(P ∘ prefill)``, ``acc ← α·acc + P V``.
    ``MASKED=False`` for a whole block (no visibility mask)."""
    cols = start_n + offs_n
    col_ok = cols < num_keys
    k = _load_tile(k_base, cols, stride_kt, num_keys, offs_d, d_ok)
    v = _load_tile(v_base, cols, stride_vt, num_keys, offs_d, d_ok)
    s = _scores(q, k, scale, softcap, HAS_SOFTCAP, PRECISION, TANH)
    if MASKED:
        s = tl.where(_visible(offs_m, cols, kpad_row, window, num_queries, num_keys, CAUSAL, HAS_PAD, HAS_WINDOW),
                     s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    prefill = tl.load(prefill_row + cols, mask=col_ok, other=0).to(tl.float32)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    ls_i = ls_i * alpha + tl.sum(p * prefill[None, :], axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i, ls_i


@triton.jit
def _fwd_kernel(
    Q, K, V, PREFILL, KPAD, OUT, MASS, LSE,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    heads_q, group, num_queries, num_keys, head_dim, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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

    # Key blocks in three runs: the window's edge (masked), the whole blocks (no mask), the causal
    # edge and the last partial block (masked). With padding the mask is per key: one masked run.
    lo, hi = _key_range(start_m, num_queries, num_keys, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if HAS_PAD:
        for start_n in range(lo, hi, BLOCK_N):
            acc, m_i, l_i, ls_i = _fwd_step(acc, m_i, l_i, ls_i, q, k_base, v_base, prefill_row, kpad_row, start_n,
                                            offs_m, offs_n, offs_d, d_ok, stride_kt, stride_vt, scale, softcap, window,
                                            num_queries, num_keys, True, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP,
                                            PRECISION, TANH)
    else:
        full_lo, full_hi = _full_key_blocks(start_m, lo, hi, num_queries, num_keys, window, BLOCK_M, BLOCK_N,
                                            CAUSAL, HAS_WINDOW)
        for start_n in range(lo, full_lo, BLOCK_N):
            acc, m_i, l_i, ls_i = _fwd_step(acc, m_i, l_i, ls_i, q, k_base, v_base, prefill_row, kpad_row, start_n,
                                            offs_m, offs_n, offs_d, d_ok, stride_kt, stride_vt, scale, softcap, window,
                                            num_queries, num_keys, True, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP,
                                            PRECISION, TANH)
        for start_n in range(full_lo, full_hi, BLOCK_N):
            acc, m_i, l_i, ls_i = _fwd_step(acc, m_i, l_i, ls_i, q, k_base, v_base, prefill_row, kpad_row, start_n,
                                            offs_m, offs_n, offs_d, d_ok, stride_kt, stride_vt, scale, softcap, window,
                                            num_queries, num_keys, False, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP,
                                            PRECISION, TANH)
        for start_n in range(full_hi, hi, BLOCK_N):
            acc, m_i, l_i, ls_i = _fwd_step(acc, m_i, l_i, ls_i, q, k_base, v_base, prefill_row, kpad_row, start_n,
                                            offs_m, offs_n, offs_d, d_ok, stride_kt, stride_vt, scale, softcap, window,
                                            num_queries, num_keys, True, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP,
                                            PRECISION, TANH)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    mass = ls_i / l_safe
    lse = tl.where(empty, 0.0, tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_safe))
    o_ptrs = (OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m.to(tl.int64)[:, None] * stride_ot
              + offs_d[None, :])
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    row_index = bh.to(tl.int64) * num_queries + offs_m
    tl.store(MASS + row_index, mass, mask=row_ok)
    tl.store(LSE + row_index, lse, mask=row_ok)


@triton.jit
def _dkdv_step(dk, dv, k, v, prefill, q_base, do_base, bh, start_m, cols, offs_d, d_ok, kpad_row,
               LSE, DELTA, GMASS, stride_qt, stride_dot, scale, softcap, window, num_queries, num_keys,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query block against the program's key block: ``P = exp(S − lse)``, ``dV += Pᵀ dO``,
    ``dK += dSᵀ Q``. ``MASKED=False`` for a block that sees the whole key block."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < num_queries
    q = _load_tile(q_base, offs_m, stride_qt, num_queries, offs_d, d_ok)
    do = _load_tile(do_base, offs_m, stride_dot, num_queries, offs_d, d_ok)
    row_index = bh.to(tl.int64) * num_queries + offs_m
    lse = tl.load(LSE + row_index, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_index, mask=row_ok, other=0.0)
    g = tl.load(GMASS + row_index, mask=row_ok, other=0.0)
    s = _scores(q, k, scale, softcap, HAS_SOFTCAP, PRECISION, TANH)
    p = tl.exp(s - lse[:, None])
    if MASKED:
        p = tl.where(_visible(offs_m, cols, kpad_row, window, num_queries, num_keys, CAUSAL, HAS_PAD, HAS_WINDOW),
                     p, 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    ds = _score_gradient(p, s, do, v, g, prefill, delta, softcap, HAS_SOFTCAP, PRECISION)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, PREFILL, KPAD, DO, LSE, DELTA, GMASS, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    heads_q, heads_kv, group, num_queries, num_keys, head_dim, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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

    # Query blocks in three runs: the causal edge (masked), the whole blocks (no mask), the
    # window's edge and the last partial block (masked). With padding: one masked run (the whole
    # range is then unused).
    m_lo, m_hi = _query_range(start_n, num_queries, num_keys, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    full_lo, full_hi = _full_query_blocks(start_n, m_lo, m_hi, num_queries, num_keys, window, BLOCK_M, BLOCK_N,
                                          CAUSAL, HAS_WINDOW)
    for hq in range(0, group):
        h = hk * group + hq
        bh = b * heads_q + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        if HAS_PAD:
            for start_m in range(m_lo, m_hi, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, prefill, q_base, do_base, bh, start_m, cols, offs_d, d_ok, kpad_row,
                                    LSE, DELTA, GMASS, stride_qt, stride_dot, scale, softcap, window, num_queries,
                                    num_keys, True, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TANH,
                                    BLOCK_M)
        else:
            for start_m in range(m_lo, full_lo, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, prefill, q_base, do_base, bh, start_m, cols, offs_d, d_ok, kpad_row,
                                    LSE, DELTA, GMASS, stride_qt, stride_dot, scale, softcap, window, num_queries,
                                    num_keys, True, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TANH,
                                    BLOCK_M)
            for start_m in range(full_lo, full_hi, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, prefill, q_base, do_base, bh, start_m, cols, offs_d, d_ok, kpad_row,
                                    LSE, DELTA, GMASS, stride_qt, stride_dot, scale, softcap, window, num_queries,
                                    num_keys, False, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TANH,
                                    BLOCK_M)
            for start_m in range(full_hi, m_hi, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, prefill, q_base, do_base, bh, start_m, cols, offs_d, d_ok, kpad_row,
                                    LSE, DELTA, GMASS, stride_qt, stride_dot, scale, softcap, window, num_queries,
                                    num_keys, True, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TANH,
                                    BLOCK_M)

    out_offsets = (bhk.to(tl.int64) * num_keys + cols.to(tl.int64))[:, None] * head_dim + offs_d[None, :]
    tl.store(DK + out_offsets, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_step(dq, q, do, lse, delta, g, k_base, v_base, prefill_row, kpad_row, start_n, offs_m, offs_n, offs_d, d_ok,
             stride_kt, stride_vt, scale, softcap, window, num_queries, num_keys,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, TANH: tl.constexpr):
    """One key block of ``dQ += dS K``. ``MASKED=False`` for a whole block."""
    cols = start_n + offs_n
    col_ok = cols < num_keys
    k = _load_tile(k_base, cols, stride_kt, num_keys, offs_d, d_ok)
    v = _load_tile(v_base, cols, stride_vt, num_keys, offs_d, d_ok)
    prefill = tl.load(prefill_row + cols, mask=col_ok, other=0).to(tl.float32)
    s = _scores(q, k, scale, softcap, HAS_SOFTCAP, PRECISION, TANH)
    p = tl.exp(s - lse[:, None])
    if MASKED:
        p = tl.where(_visible(offs_m, cols, kpad_row, window, num_queries, num_keys, CAUSAL, HAS_PAD, HAS_WINDOW),
                     p, 0.0)
    ds = _score_gradient(p, s, do, v, g, prefill, delta, softcap, HAS_SOFTCAP, PRECISION)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, PREFILL, KPAD, DO, LSE, DELTA, GMASS, DQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    heads_q, group, num_queries, num_keys, head_dim, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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

    # The forward's three runs of key blocks (one masked run with padding).
    lo, hi = _key_range(start_m, num_queries, num_keys, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if HAS_PAD:
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, g, k_base, v_base, prefill_row, kpad_row, start_n, offs_m, offs_n,
                          offs_d, d_ok, stride_kt, stride_vt, scale, softcap, window, num_queries, num_keys,
                          True, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TANH)
    else:
        full_lo, full_hi = _full_key_blocks(start_m, lo, hi, num_queries, num_keys, window, BLOCK_M, BLOCK_N,
                                            CAUSAL, HAS_WINDOW)
        for start_n in range(lo, full_lo, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, g, k_base, v_base, prefill_row, kpad_row, start_n, offs_m, offs_n,
                          offs_d, d_ok, stride_kt, stride_vt, scale, softcap, window, num_queries, num_keys,
                          True, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TANH)
        for start_n in range(full_lo, full_hi, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, g, k_base, v_base, prefill_row, kpad_row, start_n, offs_m, offs_n,
                          offs_d, d_ok, stride_kt, stride_vt, scale, softcap, window, num_queries, num_keys,
                          False, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TANH)
        for start_n in range(full_hi, hi, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, g, k_base, v_base, prefill_row, kpad_row, start_n, offs_m, offs_n,
                          offs_d, d_ok, stride_kt, stride_vt, scale, softcap, window, num_queries, num_keys,
                          True, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TANH)

    tl.store(DQ + (bh.to(tl.int64) * num_queries + offs_m.to(tl.int64))[:, None] * head_dim + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


class Tile(NamedTuple):
    """One launch configuration of an attention kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


KERNELS = ("fwd", "dkdv", "dq")
BLOCK_DS = (16, 32, 64, 128, 256)
T = Tile

# GPU launch configurations: GPU_TILES[kernel][arch][BLOCK_D] lists the tiles autotune chooses from,
# the first being the default. Architectures other than sm_80 / sm_90 use the sm_80 lists (autotune
# drops a tile that does not fit the device's shared memory). Chosen with
# `python -m benchmarks.tile_search` / `python -m benchmarks.compile_check`: ptxas of the Triton 3.9
# wheel, no GPU, worst-case flags (causal + padding + window + softcap), bf16; rows in
# benchmarks/results/compile_check.csv (the same tiles measured under Triton 3.6 in brackets).
#
#   kernel arch  D    tile M×N/warps/stages   regs        spills  smem KiB
#   fwd    sm80  64   128×64/4/2              255 [255]   0       24
#   fwd    sm80  128  64×32/4/2               230 [230]   0       28   (fp32-TF32: 255, 0, 72.5)
#   fwd    sm90  64   128×64/4/2              247 [232]   0       32   wgmma
#   fwd    sm90  128  128×64/8/2              192 [—]     0       64   wgmma (64×64/4/2 spilled after the mask split)
#   dkdv   sm80  64   32×32/4/2               160 [144]   0       18   (was 128×64/4/2: 255 regs, spills)
#   dkdv   sm80  128  32×64/8/2               226 [211]   0       52
#   dkdv   sm90  64   32×64/8/2               163 [175]   0       32   wgmma + mma
#   dkdv   sm90  128  32×64/8/2               192 [197]   0       64   wgmma + mma
#   dq     sm80  64   64×32/8/2               165 [168]   0       24
#   dq     sm80  128  64×32/8/2               180 [176]   0       48
#   dq     sm90  64   64×32/8/2               127 [127]   0       24   wgmma
#   dq     sm90  128  64×32/8/2               193 [212]   0       48   wgmma
# D = 16, 32 and 256 are checked by the default level of the compile check (not in CI). Registers are
# at everything-on before the mask split (3a63ef2); the README has the CI figures after it.
GPU_TILES: dict[str, dict[int, dict[int, list[Tile]]]] = {
    "fwd": {
        90: {16: [T(128, 64, 4, 2)], 32: [T(128, 64, 4, 2)], 64: [T(128, 64, 4, 2)], 128: [T(128, 64, 8, 2)],
             256: [T(64, 32, 8, 1)]},
        80: {16: [T(128, 64, 4, 2)], 32: [T(128, 64, 4, 2)], 64: [T(128, 64, 4, 2)], 128: [T(64, 32, 4, 2)],
             256: [T(64, 32, 8, 1)]},
    },
    "dkdv": {
        90: {16: [T(64, 64, 4, 2)], 32: [T(64, 64, 4, 2)], 64: [T(32, 64, 8, 2)], 128: [T(32, 64, 8, 2)],
             256: [T(32, 32, 8, 1)]},
        80: {16: [T(64, 64, 8, 2)], 32: [T(64, 32, 8, 1)], 64: [T(32, 32, 4, 2)], 128: [T(32, 64, 8, 2)],
             256: [T(32, 32, 8, 1)]},
    },
    "dq": {
        90: {16: [T(64, 64, 4, 2)], 32: [T(64, 64, 4, 2)], 64: [T(64, 32, 8, 2)], 128: [T(64, 32, 8, 2)],
             256: [T(32, 32, 8, 1)]},
        80: {16: [T(64, 64, 4, 2)], 32: [T(64, 64, 4, 2)], 64: [T(64, 32, 8, 2)], 128: [T(64, 32, 8, 2)],
             256: [T(32, 32, 8, 1)]},
    },
}
del T

# float32 inputs with TF32 dots hold their operand tiles in 32-bit registers: where the half-precision
# tile spills, they get their own (GPU_TILES_TF32[kernel][arch][BLOCK_D], else GPU_TILES), chosen the
# same way over the default flag sets (table in benchmarks/results/compile_check.csv, float32 rows).
GPU_TILES_TF32: dict[str, dict[int, dict[int, list[Tile]]]] = {
    "fwd": {80: {32: [Tile(64, 64, 4, 2)], 64: [Tile(64, 64, 8, 2)], 128: [Tile(64, 64, 8, 1)]},
            90: {16: [Tile(64, 64, 8, 2)], 32: [Tile(64, 64, 8, 2)], 64: [Tile(64, 64, 8, 2)],
                 128: [Tile(32, 64, 8, 2)], 256: [Tile(32, 64, 8, 2)]}},
    "dkdv": {80: {16: [Tile(64, 64, 8, 1)], 256: [Tile(16, 32, 8, 1)]},
             90: {32: [Tile(64, 64, 4, 1)], 128: [Tile(32, 64, 8, 1)]}},
    "dq": {},
}

# IEEE float32 (``precision="ieee"`` on float32 inputs) runs its dots as FMAs on CUDA cores, holding
# more of each operand tile per thread: GPU_TILES_IEEE[kernel][arch][BLOCK_D]. 32×32/4/1 everywhere
# spilled from D = 128 (up to 39 KB at D = 256) and by 8–20 B in places below; these are spill-free
# over the default flag sets on sm_80 and sm_90 under Triton 3.9 and 3.6 (compile_check --level
# default --dtype float32-ieee), except dK/dV on sm_80 at D = 256, where no tile tried is spill-free
# under both: the table keeps 3.9's (3.6 spills 24 B there). dK/dV sm_80 D = 128 needs 16 warps.
T = Tile
GPU_TILES_IEEE: dict[str, dict[int, dict[int, list[Tile]]]] = {
    "fwd": {80: {16: [T(32, 32, 4, 1)], 32: [T(32, 32, 4, 1)], 64: [T(16, 16, 4, 1)], 128: [T(16, 32, 8, 1)],
                 256: [T(16, 16, 8, 1)]},
            90: {16: [T(32, 32, 4, 1)], 32: [T(16, 16, 4, 1)], 64: [T(32, 16, 4, 1)], 128: [T(16, 16, 4, 1)],
                 256: [T(16, 16, 8, 1)]}},
    "dkdv": {80: {16: [T(16, 16, 8, 1)], 32: [T(16, 16, 8, 1)], 64: [T(16, 16, 8, 1)], 128: [T(16, 16, 16, 1)],
                  256: [T(16, 16, 8, 1)]},
             90: {16: [T(16, 16, 4, 1)], 32: [T(32, 16, 4, 1)], 64: [T(16, 16, 2, 1)], 128: [T(16, 16, 8, 1)],
                  256: [T(16, 16, 8, 1)]}},
    "dq": {80: {16: [T(32, 32, 4, 1)], 32: [T(32, 32, 4, 1)], 64: [T(16, 16, 4, 1)], 128: [T(16, 16, 4, 1)],
                256: [T(16, 16, 8, 1)]},
           90: {16: [T(32, 32, 4, 1)], 32: [T(16, 16, 8, 1)], 64: [T(16, 16, 4, 1)], 128: [T(16, 16, 8, 1)],
                256: [T(16, 16, 8, 1)]}},
}
del T

# The interpreter runs one tile per kernel (speed; multi-config autotune needs a GPU). Tests swap in
# GPU tiles (BLOCK_M ≠ BLOCK_N) to run the GPU launch configurations in the interpreter.
INTERPRETER_TILES: dict[str, Tile] = {name: Tile(32, 32, 4, 1) for name in KERNELS}

def block_d_of(head_dim: int) -> int:
    """Head-dim block: the next power of two, at least 16 (``tl.dot`` needs K, N ≥ 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def arch_family(capability: tuple[int, int]) -> int:
    """The tile table an architecture uses: 90 for Hopper, 80 for everything else."""
    return 90 if capability[0] == 9 else 80


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``: the dtype key of the tile tables."""
    return str(dtype).removeprefix("torch.")


def gpu_tiles(kernel: str, arch: int, block_d: int, precision: str, dtype: str = "bfloat16") -> list[Tile]:
    """The tiles autotune chooses among for ``kernel`` on ``arch`` (80 or 90), head-dim block
    ``block_d``, dot ``precision`` and input ``dtype`` ("float16", "bfloat16" or "float32")."""
    if precision == "ieee":
        return list(GPU_TILES_IEEE[kernel][arch][block_d])
    if dtype == "float32" and block_d in GPU_TILES_TF32[kernel].get(arch, {}):
        return list(GPU_TILES_TF32[kernel][arch][block_d])
    return list(GPU_TILES[kernel][arch][block_d])


def precision_of(dtype: torch.dtype, precision: str | None) -> str:
    """``tl.dot``'s ``input_precision``: float32 inputs use ``"tf32"`` on a GPU unless ``"ieee"``
    is asked for; the interpreter always computes IEEE float32. Half precisions ignore it."""
    if dtype != torch.float32:
        return "tf32"
    if interpreter_enabled():
        return "ieee"
    return precision or "tf32"


def tanh_of(dtype: torch.dtype) -> str:
    """The softcap's tanh: exp/log form in the interpreter, hardware tanh for half inputs on a
    GPU, libdevice's accurate tanhf for float32 on a GPU."""
    if interpreter_enabled():
        return "exp"
    return "libdevice" if dtype == torch.float32 else "approx"


_KERNEL_FNS = {"fwd": "_fwd_kernel", "dkdv": "_dkdv_kernel", "dq": "_dq_kernel"}
_TUNE_KEY = ["BLOCK_D", "CAUSAL", "HAS_PAD", "HAS_WINDOW", "HAS_SOFTCAP", "PRECISION"]


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=None)
def _autotuned(kernel: str):
    """``kernel`` wrapped in ``triton.autotune`` over every GPU tile; pruning keeps those listed
    for the current device, head-dim block and precision (the pointer dtypes join the key)."""
    tiles = {t for table in (GPU_TILES, GPU_TILES_TF32, GPU_TILES_IEEE) for per_arch in table[kernel].values()
             for per_d in per_arch.values() for t in per_d}
    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps,
                             num_stages=t.num_stages) for t in sorted(tiles)]

    def prune(configs, named_args, **kwargs):
        arch = arch_family(_capability(torch.cuda.current_device()))
        allowed = gpu_tiles(kernel, arch, kwargs["BLOCK_D"], kwargs["PRECISION"], dtype_name(named_args["Q"].dtype))
        kept = [c for c in configs
                if Tile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        return kept or configs[:1]

    return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune})(
        globals()[_KERNEL_FNS[kernel]])


def _launch(kernel: str, grid_axis0: int, grid_len: int, args: tuple, flags: dict, block_d: int) -> None:
    """Launch ``kernel`` over ``(grid_axis0, ⌈grid_len / tile⌉)`` (BLOCK_N for dK/dV, else BLOCK_M)."""
    along = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"
    if interpreter_enabled():
        tile = INTERPRETER_TILES[kernel]
        meta = {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n}
        globals()[_KERNEL_FNS[kernel]][(grid_axis0, triton.cdiv(grid_len, meta[along]))](
            *args, **flags, **meta, BLOCK_D=block_d, num_warps=tile.num_warps, num_stages=tile.num_stages)
        return

    def grid(meta):
        return grid_axis0, triton.cdiv(grid_len, meta[along])

    _autotuned(kernel)[grid](*args, **flags, BLOCK_D=block_d)


def _flags(spec: AttentionMask, key_padding_mask, dtype, precision: str | None) -> dict:
    return dict(CAUSAL=spec.causal, HAS_PAD=key_padding_mask is not None, HAS_WINDOW=spec.window is not None,
                HAS_SOFTCAP=spec.softcap is not None, PRECISION=precision_of(dtype, precision), TANH=tanh_of(dtype))


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


def attention_forward(q, k, v, prefill_u8, kpad_u8, spec: AttentionMask, precision: str | None = None):
    """Launch the forward kernel. Returns ``(out, mass, lse)``; ``*_u8`` masks are uint8 ``[B, Tk]``."""
    batch, heads_q, num_queries, head_dim = q.shape
    heads_kv, num_keys = k.shape[1], k.shape[2]
    out = _new(q.shape, q.dtype, q.device)
    mass = _new((batch, heads_q, num_queries), torch.float32, q.device)
    lse = _new((batch, heads_q, num_queries), torch.float32, q.device)
    if num_queries == 0:
        return out, mass, lse
    args = (q, k, v, prefill_u8, kpad_u8 if kpad_u8 is not None else prefill_u8, out, mass, lse,
            *_strides(q, k, v, out), heads_q, heads_q // heads_kv, num_queries, num_keys, head_dim, *_scalars(spec))
    _launch("fwd", batch * heads_q, num_queries, args, _flags(spec, kpad_u8, q.dtype, precision), block_d_of(head_dim))
    return out, mass, lse


def attention_backward(q, k, v, prefill_u8, kpad_u8, spec, out, mass, lse, grad_out, grad_mass,
                       precision: str | None = None):
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
    flags = _flags(spec, kpad_u8, q.dtype, precision)
    block_d = block_d_of(head_dim)
    kpad_arg = kpad_u8 if kpad_u8 is not None else prefill_u8
    strides = _strides(q, k, v, grad_out)
    _launch("dkdv", batch * heads_kv, num_keys,
            (q, k, v, prefill_u8, kpad_arg, grad_out, lse, delta, grad_mass, dk, dv, *strides,
             heads_q, heads_kv, heads_q // heads_kv, num_queries, num_keys, head_dim, *_scalars(spec)), flags, block_d)
    _launch("dq", batch * heads_q, num_queries,
            (q, k, v, prefill_u8, kpad_arg, grad_out, lse, delta, grad_mass, dq, *strides,
             heads_q, heads_q // heads_kv, num_queries, num_keys, head_dim, *_scalars(spec)), flags, block_d)
    return dq, dk, dv


class PrefillAttentionFunction(torch.autograd.Function):
    """``(out, mass) = prefill_attention(q, k, v, ...)`` on the Triton kernels, differentiable in
    ``q, k, v`` through both outputs."""

    @staticmethod
    def forward(ctx, q, k, v, prefill_mask, key_padding_mask, spec: AttentionMask, precision: str | None = None):
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        prefill_u8 = prefill_mask.to(torch.uint8).contiguous()
        kpad_u8 = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
        out, mass, lse = attention_forward(q, k, v, prefill_u8, kpad_u8, spec, precision)
        ctx.save_for_backward(q, k, v, prefill_u8, kpad_u8, out, mass, lse)
        ctx.spec = spec
        ctx.precision = precision
        return out, mass

    @staticmethod
    def backward(ctx, grad_out, grad_mass):
        q, k, v, prefill_u8, kpad_u8, out, mass, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_mass is None:
            grad_mass = torch.zeros_like(mass)
        dq, dk, dv = attention_backward(q, k, v, prefill_u8, kpad_u8, ctx.spec, out, mass, lse,
                                        grad_out, grad_mass.float().contiguous(), ctx.precision)
        return dq, dk, dv, None, None, None, None
