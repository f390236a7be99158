"""Triton implementation of :func:`deepalign.kernels.topk_rank` (two-stage split-vocabulary).

Stage 1, grid ``(N, NB)``: program ``(n, b)`` reads vocabulary block ``b`` of row ``n`` once and
writes, for that block,

* its ``KP`` largest 64-bit order keys (``KP`` = k rounded up to a power of two), where
  ``key(v) = ord32(x_v) · 2³² + (2³² − 1 − v)`` packs value and index so that one unsigned
  comparison orders by value descending, then index ascending (selected through a pre-filter, below);
* the block's max ``m_b`` and ``s_b = Σ exp(x − m_b)``;
* for every target ``t`` of the row, ``#{v in block : key(v) > key(t)}``;
* the number of NaN / +inf logits in the block.

Targets outside ``[0, V)`` are never read (masked); stage 2 counts them per row. Both counters
(bad logits, bad targets) stay on the device: the caller checks them once per call, or once per
batch with :class:`deepalign.kernels.ranking.TopKChecks`, so a decoding loop need not sync.

Stage 2, grid ``(N,)``: merges the ``NB · KP`` candidate keys (``NB_PAD`` blocks at a time, keeping a
running top ``KP``) into the row's top ``k`` and unpacks
them into indices (values are then read from the logits, k loads), combines ``logsumexp = M + log Σ_b s_b · exp(m_b − M)`` with
``M = max_b m_b``, sums the rank counts and the bad-logit counts.

**Pre-filter** (k ≥ 3). A bitonic top-``KP`` over the whole block costs about
``log²KP / 2 + 2 log KP`` 64-bit compare-exchanges per logit. Stage 1 first narrows the block to a few
candidates, exactly: split the block into ``G = 4·KP`` strided groups (group ``j`` = lanes
``≡ j mod G``), take each group's largest value half ``ord32(x)`` of the keys and let ``τ`` be the
k-th largest of those ``G`` maxima. At least k lanes have ``ord32 ≥ τ`` (the k groups' maxima), so
the block's top k keys all do, and the top k of ``{ord32 ≥ τ}`` is the top k of the block. The ``c``
candidates are compacted (prefix sum, scatter to a per-program scratch row of ``CAP = 2·KP`` slots,
barrier, reload) and only they go through the selection network. When ``c > CAP`` (adversarial
blocks only: on i.i.d. logits ``c`` stays close to k, at most 34 of 4096 at k = 20 over 300 draws)
the block takes the full network, so the result is exact either way. Ahead-of-time SASS counts
(``benchmarks/topk_selection_cost``) give the selection 100–136 instructions per logit against the
network's 228–301 at k = 20–64; at k ≤ 2 the network is cheaper and is kept.

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
MAX_K_KERNEL = 64
# Vocabulary blocks a GPU launch can use (at most MAX_BLOCKS_PER_ROW blocks per row up to
# 64 · 2048 = 128k entries; larger vocabularies use more 2048-blocks and stage 2 loops over them)
# and the candidate blocks stage 2 merges at a time. Spill-free per benchmarks/compile_check: 4096-blocks
# (8 warps) spilled 4–16 B on sm_80 at k = 2, 3, 8, and a one-block merge (NB_PAD = 1) 4–12 B.
GPU_BLOCK_VS = (1024, 2048)
MERGE_NB_PADS = (2, 4, 8, 16, 32, 64)
M_TILE_MAX = 4
MERGE_WARPS = 8
# Pre-filter shape, in units of KP: strided groups whose maxima set the threshold, and the candidate
# slots per program (more candidates fall back to the full selection network).
PREFILTER_GROUPS_PER_KP = 4
PREFILTER_CAP_PER_KP = 2


def partial_warps(block_v: int) -> int:
    """Warps of a stage-1 program: 4 up to 1024 entries, 8 above (4 warps spill at 2048 on sm_80)."""
    return 4 if block_v <= 1024 else 8


def use_bitonic(k: int, interpreted: bool) -> bool:
    """The selection network: Triton's bitonic ``tl.topk`` on a GPU, the k-round max loop in the
    interpreter (where ``tl.topk`` is a slow Python loop). ``k = 1`` is a single max reduction
    either way (it never calls ``tl.topk``, whose k = 1 result is 0-d on Triton 3.6)."""
    return not interpreted


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
    """The largest of the distinct unsigned ``keys`` (1-D) in descending order, as a ``[KP]`` tensor
    whose first ``K`` slots are exact (slots past ``K`` hold either the next keys or 0). With ties the
    max loop takes each value once, so its slots then hold the largest distinct values.

    ``BITONIC`` uses Triton's bitonic ``tl.topk``; otherwise ``K`` rounds of "take the max, then
    knock it out". Both are exact. The max loop runs on Triton's fast reductions, which matters
    in the interpreter, where ``tl.topk`` is a Python-level loop per element. ``KP = 1`` is one
    max reduction in both (Triton 3.6's ``tl.topk(x, 1)`` is 0-d, 3.9's 1-d: neither is used).
    """
    if KP == 1:
        top = tl.zeros((1,), dtype=keys.dtype) | tl.max(keys, axis=0)
    elif BITONIC:
        top = tl.topk(keys, KP)
    else:
        slots = tl.arange(0, KP)
        top = tl.zeros((KP,), dtype=keys.dtype)
        for r in tl.static_range(K):
            best = tl.max(keys, axis=0)
            top = tl.where(slots == r, best, top)
            keys = tl.where(keys == best, 0, keys)
    return top


@triton.jit
def _prefilter_threshold(values, BLOCK_V: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, GROUPS: tl.constexpr,
                         BITONIC: tl.constexpr):
    """``τ``: the ``K``-th largest of the maxima of ``GROUPS`` strided groups of the unsigned
    ``values [BLOCK_V]`` (group ``j`` = lanes ``j, j + GROUPS, …``), or a smaller value where the max
    loop meets ties among the maxima. At least ``K`` lanes have ``values ≥ τ``."""
    group_max = tl.max(tl.reshape(values, (BLOCK_V // GROUPS, GROUPS)), axis=0)
    top = _select_top(group_max, K, KP, BITONIC)
    return tl.max(tl.where(tl.arange(0, KP) == K - 1, top, 0), axis=0)


@triton.jit
def _compacted(keys, alive, scratch_row, CAP: tl.constexpr):
    """The ``alive`` lanes of ``keys`` (at most ``CAP`` of them) as a ``[CAP]`` tensor, padded with 0:
    each alive key is stored at its prefix-sum position of ``scratch_row`` and read back after a
    barrier (the lanes of one program are spread over its threads)."""
    position = tl.cumsum(alive.to(tl.int32), axis=0) - 1
    tl.store(scratch_row + position, keys.to(tl.int64, bitcast=True), mask=alive)
    tl.debug_barrier()
    slots = tl.arange(0, CAP)
    count = tl.sum(alive.to(tl.int32), axis=0)
    kept = tl.load(scratch_row + slots, mask=slots < count, other=0, volatile=True)
    return kept.to(tl.uint64, bitcast=True)


@triton.jit
def _block_top(keys, scratch_row, BLOCK_V: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
               BITONIC: tl.constexpr, PREFILTER: tl.constexpr, GROUPS: tl.constexpr, CAP: tl.constexpr):
    """:func:`_select_top` of a block's ``keys``, through the pre-filter when ``PREFILTER`` (see the
    module docstring): the same ``[KP]`` result, its first ``K`` slots exact."""
    if PREFILTER:
        # The threshold works on the value half of the keys (32-bit: half the work of the 64-bit keys);
        # lanes past the vocabulary have value half 0, below every logit's.
        values = (keys >> 32).to(tl.uint32)
        alive = values >= _prefilter_threshold(values, BLOCK_V, K, KP, GROUPS, BITONIC)
        if tl.sum(alive.to(tl.int32), axis=0) <= CAP:
            top = _select_top(_compacted(keys, alive, scratch_row, CAP), K, KP, BITONIC)
        else:
            top = _select_top(keys, K, KP, BITONIC)
    else:
        top = _select_top(keys, K, KP, BITONIC)
    return top


@triton.jit
def _topk_rank_partial_kernel(
    logits_ptr, row_stride, vocab,
    targets_ptr, num_targets,
    part_keys_ptr, part_max_ptr, part_sumexp_ptr, part_counts_ptr, part_bad_ptr, scratch_ptr,
    num_blocks,
    BLOCK_V: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, M_TILE: tl.constexpr, BITONIC: tl.constexpr,
    PREFILTER: tl.constexpr, GROUPS: tl.constexpr, CAP: tl.constexpr,
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
    top = _block_top(keys, scratch_ptr + part.to(tl.int64) * CAP, BLOCK_V, K, KP, BITONIC, PREFILTER, GROUPS, CAP)
    tl.store(part_keys_ptr + part.to(tl.int64) * KP + tl.arange(0, KP), top.to(tl.int64, bitcast=True))

    # Rank counts: how many keys of this block beat each target's key.
    for m0 in range(0, num_targets, M_TILE):
        m_offsets = m0 + tl.arange(0, M_TILE)
        m_valid = m_offsets < num_targets
        target = tl.load(targets_ptr + row.to(tl.int64) * num_targets + m_offsets, mask=m_valid, other=0)
        t_ok = m_valid & (target >= 0) & (target < vocab)
        target_x = tl.load(row_ptr + target, mask=t_ok, other=0.0).to(tl.float32)
        target_key = _order_keys(target_x, target)
        beats = keys[None, :] > target_key[:, None]
        counts = tl.sum(beats.to(tl.int32), axis=1)
        tl.store(part_counts_ptr + (part.to(tl.int64) * num_targets + m_offsets), counts, mask=m_valid)


@triton.jit
def _topk_rank_merge_kernel(
    logits_ptr, row_stride, vocab,
    targets_ptr, num_targets,
    part_keys_ptr, part_max_ptr, part_sumexp_ptr, part_counts_ptr, part_bad_ptr,
    num_blocks,
    values_ptr, indices_ptr, lse_ptr, rank_ptr, logprob_ptr, bad_ptr, bad_targets_ptr,
    K: tl.constexpr, KP: tl.constexpr, NB_PAD: tl.constexpr, M_TILE: tl.constexpr, BITONIC: tl.constexpr,
):
    row = tl.program_id(0)
    row_part = row.to(tl.int64) * num_blocks
    slots = tl.arange(0, KP)
    chunk = tl.arange(0, NB_PAD)

    # Top-k of the NB·KP candidate keys, NB_PAD blocks at a time; the running top joins each chunk.
    top = tl.zeros((KP,), dtype=tl.uint64)
    row_max = tl.full((NB_PAD,), float("-inf"), dtype=tl.float32)
    bad_logits = tl.zeros((NB_PAD,), dtype=tl.int32)
    for b0 in range(0, num_blocks, NB_PAD):
        blocks = b0 + chunk
        block_valid = blocks < num_blocks
        cand_offsets = (row_part + blocks)[:, None] * KP + slots[None, :]
        cand = tl.load(part_keys_ptr + cand_offsets, mask=block_valid[:, None], other=0).to(tl.uint64, bitcast=True)
        chunk_top = _select_top(tl.reshape(cand, (NB_PAD * KP,)), K, KP, BITONIC)
        top = _select_top(tl.reshape(tl.join(top, chunk_top), (2 * KP,)), K, KP, BITONIC)
        row_max = tl.maximum(row_max, tl.load(part_max_ptr + row_part + blocks, mask=block_valid,
                                              other=float("-inf")))
        bad_logits += tl.load(part_bad_ptr + row_part + blocks, mask=block_valid, other=0)
    indices = (~(top & 0xFFFFFFFF).to(tl.uint32)).to(tl.int64)
    values = tl.load(logits_ptr + row.to(tl.int64) * row_stride + indices, mask=slots < K)  # exact, sign of zero kept
    out_offsets = row.to(tl.int64) * K + slots
    tl.store(values_ptr + out_offsets, values, mask=slots < K)
    tl.store(indices_ptr + out_offsets, indices, mask=slots < K)
    tl.store(bad_ptr + row, tl.sum(bad_logits, axis=0))

    # logsumexp from the per-block (max, sum-exp) pairs: M = max_b m_b first, then Σ s_b · exp(m_b − M).
    m_all = tl.max(row_max, axis=0)
    safe_max = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.zeros((NB_PAD,), dtype=tl.float32)
    for b0 in range(0, num_blocks, NB_PAD):
        blocks = b0 + chunk
        block_valid = blocks < num_blocks
        part_max = tl.load(part_max_ptr + row_part + blocks, mask=block_valid, other=float("-inf"))
        part_sumexp = tl.load(part_sumexp_ptr + row_part + blocks, mask=block_valid, other=0.0)
        total += part_sumexp * tl.exp(part_max - safe_max)
    lse = safe_max + tl.log(tl.sum(total, axis=0))  # log(0) = -inf for an all -inf row
    tl.store(lse_ptr + row, lse)

    # Ranks and log-probabilities of the targets; targets outside [0, V) are counted, not read.
    bad_targets = tl.zeros((M_TILE,), dtype=tl.int32)
    for m0 in range(0, num_targets, M_TILE):
        m_offsets = m0 + tl.arange(0, M_TILE)
        m_valid = m_offsets < num_targets
        rank = tl.zeros((M_TILE,), dtype=tl.int64)
        for b0 in range(0, num_blocks, NB_PAD):
            blocks = b0 + chunk
            block_valid = blocks < num_blocks
            count_offsets = (row_part + blocks)[:, None] * num_targets + m_offsets[None, :]
            counts = tl.load(part_counts_ptr + count_offsets, mask=block_valid[:, None] & m_valid[None, :], other=0)
            rank += tl.sum(counts, axis=0).to(tl.int64)
        row_targets = row.to(tl.int64) * num_targets + m_offsets
        target = tl.load(targets_ptr + row_targets, mask=m_valid, other=0)
        t_ok = (target >= 0) & (target < vocab)
        bad_targets += (m_valid & ~t_ok).to(tl.int32)
        target_x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + target, mask=m_valid & t_ok, other=0.0)
        target_x = target_x.to(tl.float32)
        logprob = tl.where(target_x == float("-inf"), float("-inf"), target_x - lse)
        tl.store(rank_ptr + row_targets, tl.where(t_ok, rank, -1), mask=m_valid)
        tl.store(logprob_ptr + row_targets, tl.where(t_ok, logprob, float("nan")), mask=m_valid)
    tl.store(bad_targets_ptr + row, tl.sum(bad_targets, axis=0))


def prefilter_shape(k_padded: int, block_v: int) -> tuple[int, int] | None:
    """``(groups, cap)`` of the pre-filter for a padded k and block, or ``None`` where it does not
    pay: ``k ≤ 2`` (a network of one or two stages per logit costs less than the pre-filter; 47–54
    against 59–66 SASS instructions per logit at k = 2, benchmarks/topk_selection_cost) and blocks
    under two keys per group."""
    groups = PREFILTER_GROUPS_PER_KP * k_padded
    if k_padded <= 2 or block_v < 2 * groups:
        return None
    return groups, PREFILTER_CAP_PER_KP * k_padded


def choose_block_v(vocab: int, k_padded: int) -> int:
    """Vocabulary block per stage-1 program: enough programs to fill a GPU at small N, at most
    ``MAX_BLOCKS_PER_ROW`` blocks up to ``64 · GPU_BLOCK_VS[-1]`` entries (more, of the largest
    block, beyond), so that every block size a GPU launch uses is one the compile check covers."""
    floor = 256 if interpreter_enabled() else GPU_BLOCK_VS[0]
    block = max(floor, k_padded, triton.next_power_of_2(triton.cdiv(vocab, MAX_BLOCKS_PER_ROW)))
    block = min(block, max(floor, triton.next_power_of_2(vocab)))
    return block if interpreter_enabled() else min(block, GPU_BLOCK_VS[-1])


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
    nb_pad: int | None = None,
    prefilter: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor,
           torch.Tensor]:
    """Launch both stages. ``logits [N, V]`` with unit last stride (``N ≥ 1``), ``targets [N, M]``
    int64 contiguous or ``None``. ``block_v`` (a power of two ≥ the padded k) overrides the block
    choice; tests use it to force many blocks. ``bitonic`` picks the selection network (default:
    bitonic on a GPU, the max loop in the interpreter); ``nb_pad`` the blocks stage 2 merges at a
    time (default: all, at least ``MERGE_NB_PADS[0]``, up to ``MAX_BLOCKS_PER_ROW``); ``prefilter``
    the candidate pre-filter (default: wherever :func:`prefilter_shape` allows it; ``True`` where it
    does not is an error). Returns the tuple of
    :func:`topk_rank_reference` plus ``bad_targets [N]`` (int32, targets outside ``[0, V)`` per row).
    Nothing here waits for the device."""
    n_rows, vocab = logits.shape
    device = logits.device
    k_padded = triton.next_power_of_2(k)
    block = block_v or choose_block_v(vocab, k_padded)
    if block & (block - 1) or block < k_padded:
        raise ValueError(f"block_v must be a power of two ≥ {k_padded}, got {block}")
    num_blocks = triton.cdiv(vocab, block)
    if bitonic is None:
        bitonic = use_bitonic(k, interpreter_enabled())
    num_targets = 0 if targets is None else targets.shape[1]
    target_arg = targets if targets is not None else torch.zeros(1, dtype=torch.int64, device=device)
    m_tile = min(M_TILE_MAX, triton.next_power_of_2(max(num_targets, 1)))

    part_keys = torch.empty((n_rows, num_blocks, k_padded), dtype=torch.int64, device=device)
    part_max = torch.empty((n_rows, num_blocks), dtype=torch.float32, device=device)
    part_sumexp = torch.empty_like(part_max)
    part_counts = torch.empty((n_rows, num_blocks, max(num_targets, 1)), dtype=torch.int32, device=device)
    part_bad = torch.empty((n_rows, num_blocks), dtype=torch.int32, device=device)
    shape = prefilter_shape(k_padded, block)
    if prefilter and shape is None:
        raise ValueError(f"the pre-filter needs k > 2 and block_v ≥ {2 * PREFILTER_GROUPS_PER_KP * k_padded}, "
                         f"got k={k}, block_v={block}")
    use_prefilter = shape is not None and prefilter is not False
    groups, cap = shape if use_prefilter else (1, 1)
    scratch = torch.empty((n_rows, num_blocks, cap) if use_prefilter else (1,), dtype=torch.int64, device=device)

    values = _alloc((n_rows, k), logits.dtype, device, float("nan"))
    indices = _alloc((n_rows, k), torch.int64, device, -7)
    lse = _alloc((n_rows,), torch.float32, device, float("nan"))
    bad = _alloc((n_rows,), torch.int32, device, -7)
    bad_targets = _alloc((n_rows,), torch.int32, device, -7)
    rank = _alloc((n_rows, max(num_targets, 1)), torch.int64, device, -7)
    logprob = _alloc((n_rows, max(num_targets, 1)), torch.float32, device, float("nan"))

    num_warps = partial_warps(block)
    if nb_pad is None:
        nb_pad = min(max(triton.next_power_of_2(num_blocks), MERGE_NB_PADS[0]), MAX_BLOCKS_PER_ROW)
    _topk_rank_partial_kernel[(n_rows, num_blocks)](
        logits, logits.stride(0), vocab, target_arg, num_targets,
        part_keys, part_max, part_sumexp, part_counts, part_bad, scratch, num_blocks,
        BLOCK_V=block, K=k, KP=k_padded, M_TILE=m_tile, BITONIC=bitonic, PREFILTER=use_prefilter, GROUPS=groups,
        CAP=cap, num_warps=num_warps,
    )
    _topk_rank_merge_kernel[(n_rows,)](
        logits, logits.stride(0), vocab, target_arg, num_targets,
        part_keys, part_max, part_sumexp, part_counts, part_bad, num_blocks,
        values, indices, lse, rank, logprob, bad, bad_targets,
        K=k, KP=k_padded, NB_PAD=nb_pad, M_TILE=m_tile, BITONIC=bitonic, num_warps=MERGE_WARPS,
    )
    if targets is None:
        return values, indices, lse, None, None, bad, bad_targets
    return values, indices, lse, rank, logprob, bad, bad_targets
