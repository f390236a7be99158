"""Which tiles the attention kernels run without a visibility mask: the kernels' own block-range
functions, run in the interpreter, against the visibility rule checked pair by pair.

A (query, key) pair is visible when ``j < Tk``, ``i < Tq``, ``j ≤ i + Tk − Tq`` (causal) and
``j > i + Tk − Tq − window`` (window). A tile may skip the mask only if every pair in it is visible;
the kernels must skip it for every such tile (else the split buys nothing). With key padding the
kernels mask every tile (one run; covered by the accuracy tests with padding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import example, given, settings
from hypothesis import strategies as st

from deepalign.kernels._dispatch import interpreter_enabled
from deepalign.kernels.attention_triton import _full_key_blocks, _full_query_blocks, _key_range, _query_range

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="runs the block functions in the interpreter")


@triton.jit
def _probe_key_blocks(OUT, num_queries, num_keys, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    pid = tl.program_id(0)
    start_m = pid * BLOCK_M
    lo, hi = _key_range(start_m, num_queries, num_keys, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    full_lo, full_hi = _full_key_blocks(start_m, lo, hi, num_queries, num_keys, window, BLOCK_M, BLOCK_N,
                                        CAUSAL, HAS_WINDOW)
    tl.store(OUT + pid * 4 + 0, lo)
    tl.store(OUT + pid * 4 + 1, hi)
    tl.store(OUT + pid * 4 + 2, full_lo)
    tl.store(OUT + pid * 4 + 3, full_hi)


@triton.jit
def _probe_query_blocks(OUT, num_queries, num_keys, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    pid = tl.program_id(0)
    start_n = pid * BLOCK_N
    m_lo, m_hi = _query_range(start_n, num_queries, num_keys, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    full_lo, full_hi = _full_query_blocks(start_n, m_lo, m_hi, num_queries, num_keys, window, BLOCK_M, BLOCK_N,
                                          CAUSAL, HAS_WINDOW)
    tl.store(OUT + pid * 4 + 0, m_lo)
    tl.store(OUT + pid * 4 + 1, m_hi)
    tl.store(OUT + pid * 4 + 2, full_lo)
    tl.store(OUT + pid * 4 + 3, full_hi)


def visibility(num_queries: int, num_keys: int, causal: bool, window: int | None, rows: int, cols: int) -> np.ndarray:
    """``[rows, cols]`` booleans by the rule in the module docstring (rows/cols past Tq/Tk invisible)."""
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :]
    absolute = i + num_keys - num_queries
    visible = (i < num_queries) & (j < num_keys)
    if causal:
        visible &= j <= absolute
    if window is not None:
        visible &= j > absolute - window
    return visible


shapes = st.fixed_dictionaries(dict(
    num_queries=st.integers(1, 150), num_keys=st.integers(1, 150), block_m=st.sampled_from([16, 32, 64]),
    block_n=st.sampled_from([16, 32, 64]), causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 90))))


@settings(max_examples=60, deadline=None)
@given(shapes)
@example(dict(num_queries=128, num_keys=128, block_m=32, block_n=32, causal=True, window=40))
@example(dict(num_queries=100, num_keys=140, block_m=16, block_n=32, causal=True, window=75))
def test_unmasked_key_blocks_are_exactly_the_whole_ones(shape):
    tq, tk, bm, bn, causal, window = (shape[k] for k in ("num_queries", "num_keys", "block_m", "block_n",
                                                          "causal", "window"))
    if window is not None and not causal:
        window = None  # the wrappers pass a window only with causal attention
    programs = triton.cdiv(tq, bm)
    out = torch.full((programs, 4), -7, dtype=torch.int32)
    _probe_key_blocks[(programs,)](out, tq, tk, window or 0, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
                                   HAS_WINDOW=window is not None)
    rows, cols = programs * bm, triton.cdiv(tk, bn) * bn + bn
    visible = visibility(tq, tk, causal, window, rows, cols)
    for program, (lo, hi, full_lo, full_hi) in enumerate(out.tolist()):
        m = slice(program * bm, (program + 1) * bm)
        assert lo <= full_lo <= full_hi <= max(lo, hi)
        assert not visible[m, :lo].any() and not visible[m, max(hi, 0):].any()  # the loop's range misses nothing
        whole = [start for start in range(lo, hi, bn) if visible[m, start:start + bn].all()]
        unmasked = list(range(full_lo, full_hi, bn)) if full_lo < full_hi else []
        assert full_lo == full_hi or (full_lo - lo) % bn == 0
        assert unmasked == whole, (program, lo, hi, full_lo, full_hi)


@settings(max_examples=60, deadline=None)
@given(shapes)
@example(dict(num_queries=128, num_keys=128, block_m=32, block_n=32, causal=True, window=40))
@example(dict(num_queries=100, num_keys=140, block_m=16, block_n=32, causal=True, window=75))
def test_unmasked_query_blocks_are_exactly_the_whole_ones(shape):
    tq, tk, bm, bn, causal, window = (shape[k] for k in ("num_queries", "num_keys", "block_m", "block_n",
                                                          "causal", "window"))
    if window is not None and not causal:
        window = None
    programs = triton.cdiv(tk, bn)
    out = torch.full((programs, 4), -7, dtype=torch.int32)
    _probe_query_blocks[(programs,)](out, tq, tk, window or 0, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
                                     HAS_WINDOW=window is not None)
    rows, cols = triton.cdiv(tq, bm) * bm + bm, programs * bn
    visible = visibility(tq, tk, causal, window, rows, cols)
    for program, (m_lo, m_hi, full_lo, full_hi) in enumerate(out.tolist()):
        n = slice(program * bn, (program + 1) * bn)
        assert m_lo <= full_lo <= full_hi <= max(m_lo, m_hi)
        assert not visible[:m_lo, n].any() and not visible[max(m_hi, 0):, n].any()
        whole = [start for start in range(m_lo, m_hi, bm) if visible[start:start + bm, n].all()]
        unmasked = list(range(full_lo, full_hi, bm)) if full_lo < full_hi else []
        assert full_lo == full_hi or (full_lo - m_lo) % bm == 0
        assert unmasked == whole, (program, m_lo, m_hi, full_lo, full_hi)


def test_a_long_causal_row_runs_most_tiles_unmasked():
    """Causal, Tq = Tk = 256, 32 × 32 tiles: of the 36 tiles the forward visits, the 28 below the
    diagonal skip the mask and the 8 on it keep it."""
    out = torch.zeros((8, 4), dtype=torch.int32)
    _probe_key_blocks[(8,)](out, 256, 256, 0, BLOCK_M=32, BLOCK_N=32, CAUSAL=True, HAS_WINDOW=False)
    unmasked = sum((full_hi - full_lo) // 32 for _, _, full_lo, full_hi in out.tolist())
    visited = sum(triton.cdiv(hi - lo, 32) for lo, hi, _, _ in out.tolist())
    assert (unmasked, visited) == (28, 36)
