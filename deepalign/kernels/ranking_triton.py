"""Triton implementation of :func:`deepalign.kernels.topk_rank` (two-stage split-vocabulary).

Stage 1, grid ``(N, NB)``: program ``(n, b)`` reads vocabulary block ``b`` of row ``n`` once and
writes, for that block,

* its ``KP`` largest 64-bit order keys (``KP`` = k rounded up to a power of two), where
  ``key(v) = ord32(x_v) · 2³² + (2³² − 1 − v)`` packs value and index so that one unsigned
  comparison orders by value descending, then index ascending;
* the block's max ``m_b`` and ``s_b = Σ exp(x − m_b)``;
* for every target ``t`` of the row, ``#{v in block : key(v) > key(t)}``;
* the number of NaN / +inf logits in the block.

Stage 2, grid ``(N,)``: merges the ``NB · KP`` candidate keys into the row's top ``k`` and unpacks
them into indices (values are then read from the logits, k loads), combines ``logsumexp = M + log Σ_b s_b · exp(m_b − M)`` with
``M = max_b m_b``, sums the rank counts and the bad-logit counts.

The logits are read once; stage 2 reads only the small per-block partials, plus k + M single
logits (the selected values and the targets). Keys are kept as int64 in memory and reinterpreted as uint64 inside the kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepalign.kernels._dispatch import interpreter_enabled

# Tests set this to True to fill outputs with garbage before launch, so that any element a kernel
# fails to write shows up as a mismatch.
POISON_OUTPUTS = False

MAX_BLOCKS_PER_ROW = 64


@triton.jit
def _order_keys(x, offsets):
    """uint64 order keys of float32 values ``x`` at vocabulary ``offsets`` (see module docstring)."""
    bits = x.to(tl.uint32, bitcast=True)
    # Negative floats: flip all bits; others: set the sign bit. -0.0 is not < 0, so it maps to the
    # same key bits as +0.0: the two zeros are equal logits, ordered by index.
    ordered = tl.where(x < 0.0, ~bits, bits | 0x80000000)
    low = ~(offsets.to(tl.uint32))  # 2³² − 1 − v
    return (ordered.to(tl.uint64) << 32) | low.to(tl.uint64)


@triton.jit
def _select_top(keys, K: tl.constexpr, KP: tl.constexpr, BITONIC: tl.constexpr):
    """The largest of the distinct uint64 ``keys`` (1-D) in descending order, as a ``[KP]`` tensor
    whose first ``K`` slots are exact (slots past ``K`` hold either the next keys or 0).

    ``BITONIC`` uses Triton's bitonic ``tl.topk``; otherwise ``K`` rounds of "take the max, then
    knock it out". Both are exact. The max loop runs on Triton's fast reductions, which matters
    in the interpreter, where ``tl.topk`` is a Python-level loop per element.
    """
    if BITONIC:
        top = tl.topk(keys, KP)
    else:
        slots = tl.arange(0, KP)
        top = tl.zeros((KP,), dtype=tl.uint64)
        for r in tl.static_range(K):
            best = tl.max(keys, axis=0)
            top = tl.where(slots == r, best, top)
            keys = tl.where(keys == best, 0, keys)
    return top


@triton.jit
def _topk_rank_partial_kernel(
    logits_ptr, row_stride, vocab,
    targets_ptr, num_targets,
    part_keys_ptr, part_max_ptr, part_sumexp_ptr, part_counts_ptr, part_bad_ptr,
    num_blocks,
    BLOCK_V: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, M_TILE: tl.constexpr, BITONIC: tl.constexpr,
):
    row = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offsets < vocab
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    x = tl.load(row_ptr + offsets, mask=in_vocab, other=float("-inf")).to(tl.float32)

    # NaN / +inf: counted here, reported by the host after stage 2.
    bad = (x != x) | (x == float("inf"))
    part = row * num_blocks + block
    tl.store(part_bad_ptr + part, tl.sum(bad.to(tl.int32), axis=0))

    # Partial logsumexp. A block whose logits are all -inf has s_b = 0 and m_b = -inf.
    block_max = tl.max(x, axis=0)
    safe_max = tl.where(block_max == float("-inf"), 0.0, block_max)
    sumexp = tl.sum(tl.exp(x - safe_max), axis=0)
    tl.store(part_max_ptr + part, block_max)
    tl.store(part_sumexp_ptr + part, sumexp)

    # Partial top-k over packed keys; lanes past the vocabulary get key 0, below every real key.
    keys = tl.where(in_vocab, _order_keys(x, offsets), 0)
    top = _select_top(keys, K, KP, BITONIC)
    tl.store(part_keys_ptr + part.to(tl.int64) * KP + tl.arange(0, KP), top.to(tl.int64, bitcast=True))

    # Rank counts: how many keys of this block beat each target's key.
    for m0 in range(0, num_targets, M_TILE):
        m_offsets = m0 + tl.arange(0, M_TILE)
        m_valid = m_offsets < num_targets
        target = tl.load(targets_ptr + row.to(tl.int64) * num_targets + m_offsets, mask=m_valid, other=0)
        target_x = tl.load(row_ptr + target, mask=m_valid, other=0.0).to(tl.float32)
        target_key = _order_keys(target_x, target)
        beats = keys[None, :] > target_key[:, None]
        counts = tl.sum(beats.to(tl.int32), axis=1)
        tl.store(part_counts_ptr + (part.to(tl.int64) * num_targets + m_offsets), counts, mask=m_valid)


@triton.jit
def _topk_rank_merge_kernel(
    logits_ptr, row_stride,
    targets_ptr, num_targets,
    part_keys_ptr, part_max_ptr, part_sumexp_ptr, part_counts_ptr, part_bad_ptr,
    num_blocks,
    values_ptr, indices_ptr, lse_ptr, rank_ptr, logprob_ptr, bad_ptr,
    K: tl.constexpr, KP: tl.constexpr, NB_PAD: tl.constexpr, M_TILE: tl.constexpr, BITONIC: tl.constexpr,
):
    row = tl.program_id(0)
    blocks = tl.arange(0, NB_PAD)
    block_valid = blocks < num_blocks
    part = row * num_blocks + blocks

    # Top-k of the NB·KP candidate keys.
    cand_offsets = part.to(tl.int64)[:, None] * KP + tl.arange(0, KP)[None, :]
    cand = tl.load(part_keys_ptr + cand_offsets, mask=block_valid[:, None], other=0).to(tl.uint64, bitcast=True)
    top = _select_top(tl.reshape(cand, (NB_PAD * KP,)), K, KP, BITONIC)
    indices = (~(top & 0xFFFFFFFF).to(tl.uint32)).to(tl.int64)
    r = tl.arange(0, KP)
    values = tl.load(logits_ptr + row.to(tl.int64) * row_stride + indices, mask=r < K)  # exact, sign of zero kept
    out_offsets = row.to(tl.int64) * K + r
    tl.store(values_ptr + out_offsets, values, mask=r < K)
    tl.store(indices_ptr + out_offsets, indices, mask=r < K)

    # logsumexp from the per-block (max, sum-exp) pairs.
    part_max = tl.load(part_max_ptr + part, mask=block_valid, other=float("-inf"))
    part_sumexp = tl.load(part_sumexp_ptr + part, mask=block_valid, other=0.0)
    row_max = tl.max(part_max, axis=0)
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(part_sumexp * tl.exp(part_max - safe_max), axis=0)
    lse = safe_max + tl.log(total)  # log(0) = -inf for an all -inf row
    tl.store(lse_ptr + row, lse)
    tl.store(bad_ptr + row, tl.sum(tl.load(part_bad_ptr + part, mask=block_valid, other=0), axis=0))

    # Ranks and log-probabilities of the targets.
    for m0 in range(0, num_targets, M_TILE):
        m_offsets = m0 + tl.arange(0, M_TILE)
        m_valid = m_offsets < num_targets
        count_offsets = part.to(tl.int64)[:, None] * num_targets + m_offsets[None, :]
        counts = tl.load(part_counts_ptr + count_offsets, mask=block_valid[:, None] & m_valid[None, :], other=0)
        rank = tl.sum(counts, axis=0).to(tl.int64)
        row_targets = row.to(tl.int64) * num_targets + m_offsets
        target = tl.load(targets_ptr + row_targets, mask=m_valid, other=0)
        target_x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + target, mask=m_valid, other=0.0)
        target_x = target_x.to(tl.float32)
        logprob = tl.where(target_x == float("-inf"), float("-inf"), target_x - lse)
        tl.store(rank_ptr + row_targets, rank, mask=m_valid)
        tl.store(logprob_ptr + row_targets, logprob, mask=m_valid)


def choose_block_v(vocab: int, k_padded: int) -> int:
    """Vocabulary block per stage-1 program: enough programs to fill a GPU at small N, at most
    ``MAX_BLOCKS_PER_ROW`` blocks so that stage 2 merges a bounded ``NB · KP`` candidates."""
    floor = 256 if interpreter_enabled() else 1024
    block = max(floor, k_padded, triton.next_power_of_2(triton.cdiv(vocab, MAX_BLOCKS_PER_ROW)))
    return min(block, max(floor, triton.next_power_of_2(vocab)))


def _alloc(shape, dtype, device, poison):
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, poison, dtype=dtype, device=device)


def topk_rank_triton(
    logits: torch.Tensor,
    k: int,
    targets: torch.Tensor | None,
    *,
    block_v: int | None = None,
    bitonic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Launch both stages. ``logits [N, V]`` with unit last stride (``N ≥ 1``), ``targets [N, M]``
    int64 contiguous or ``None``. ``block_v`` (a power of two ≥ the padded k) overrides the block
    choice; tests use it to force many blocks. ``bitonic`` picks the selection network (default:
    bitonic on a GPU, the max loop in the interpreter). Returns the tuple of :func:`topk_rank_reference`."""
    n_rows, vocab = logits.shape
    device = logits.device
    k_padded = triton.next_power_of_2(k)
    block = block_v or choose_block_v(vocab, k_padded)
    if block & (block - 1) or block < k_padded:
        raise ValueError(f"block_v must be a power of two ≥ {k_padded}, got {block}")
    num_blocks = triton.cdiv(vocab, block)
    if bitonic is None:
        bitonic = not interpreter_enabled()
    num_targets = 0 if targets is None else targets.shape[1]
    target_arg = targets if targets is not None else torch.zeros(1, dtype=torch.int64, device=device)
    m_tile = min(4, triton.next_power_of_2(max(num_targets, 1)))

    part_keys = torch.empty((n_rows, num_blocks, k_padded), dtype=torch.int64, device=device)
    part_max = torch.empty((n_rows, num_blocks), dtype=torch.float32, device=device)
    part_sumexp = torch.empty_like(part_max)
    part_counts = torch.empty((n_rows, num_blocks, max(num_targets, 1)), dtype=torch.int32, device=device)
    part_bad = torch.empty((n_rows, num_blocks), dtype=torch.int32, device=device)

    values = _alloc((n_rows, k), logits.dtype, device, float("nan"))
    indices = _alloc((n_rows, k), torch.int64, device, -7)
    lse = _alloc((n_rows,), torch.float32, device, float("nan"))
    bad = _alloc((n_rows,), torch.int32, device, -7)
    rank = _alloc((n_rows, max(num_targets, 1)), torch.int64, device, -7)
    logprob = _alloc((n_rows, max(num_targets, 1)), torch.float32, device, float("nan"))

    num_warps = 4 if block <= 2048 else 8
    _topk_rank_partial_kernel[(n_rows, num_blocks)](
        logits, logits.stride(0), vocab, target_arg, num_targets,
        part_keys, part_max, part_sumexp, part_counts, part_bad, num_blocks,
        BLOCK_V=block, K=k, KP=k_padded, M_TILE=m_tile, BITONIC=bitonic, num_warps=num_warps,
    )
    _topk_rank_merge_kernel[(n_rows,)](
        logits, logits.stride(0), target_arg, num_targets,
        part_keys, part_max, part_sumexp, part_counts, part_bad, num_blocks,
        values, indices, lse, rank, logprob, bad,
        K=k, KP=k_padded, NB_PAD=triton.next_power_of_2(num_blocks), M_TILE=m_tile, BITONIC=bitonic,
        num_warps=4,
    )
    if targets is None:
        return values, indices, lse, None, None, bad
    return values, indices, lse, rank, logprob, bad
