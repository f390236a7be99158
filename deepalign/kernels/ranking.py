"""Fused top-k / logsumexp / target-rank over the vocabulary, in one read of the logits.

For logits ``x`` of shape ``[N, V]`` and each row ``n``:

* ``values[n, r]``, ``indices[n, r]`` for ``r < k``: the ``k`` largest logits in the *total order*
  "by value descending, ties broken by lower index";
* ``logsumexp[n] = log Σ_v exp(x[n, v])`` (float32; ``-inf`` for a row that is all ``-inf``);
* for each target token ``t`` of the row, its 0-based rank in that order,
  ``rank(t) = #{v : x_v > x_t} + #{v < t : x_v == x_t}``, and its log-probability
  ``x_t − logsumexp`` (``-inf`` when ``x_t == -inf``, the probability of a masked token being 0).

Invariant: ``indices[n, r] == t`` if and only if ``rank(t) == r``, for every ``r < k``.

``-0.0`` and ``+0.0`` compare equal (their order is by index). ``-inf`` is a legal logit (a masked
vocabulary entry); a NaN or ``+inf`` anywhere in a row makes the distribution undefined and raises
``ValueError`` naming the row. The Triton kernel finds such rows during its one pass, and counts
targets outside ``[0, V)`` without reading them.

Host syncs: on the Triton path a call waits for the device once, to read the kernel's counters
(bad logits, bad targets) and raise. Pass ``checks=TopKChecks()`` to defer that: the call then
never waits, and ``checks.raise_if_any()`` after the batch (a decoding loop, a set of chunks)
raises the same errors with one sync. :func:`topk_rank_chunked` checks once per call, not per chunk.

The Triton kernel (``topk_rank_triton``) ranks through one order-preserving 64-bit key per
vocabulary entry, ``key(v) = ord32(x_v) · 2³² + (2³² − 1 − v)``, where ``ord32`` maps float32 bit
patterns to integers in the order of the floats: keys are distinct, so ``rank(t) = #{v : key(v) >
key(t)}`` and the top-k is the k largest keys. Each vocabulary block first drops every key below an
exact threshold (the k-th largest of strided group maxima), so the selection network sorts a few
candidates instead of the block (``ranking_triton``'s pre-filter). The PyTorch reference (``topk_rank_reference``)
applies the same order directly on the values, which is faster on a CPU.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from deepalign.kernels._dispatch import Backend, check_float_tensor, check_same_device, resolve_backend

MAX_K = 64


class TopKRank(NamedTuple):
    """Result of :func:`topk_rank`.

    values: ``[N, k]`` logits in descending order (dtype of the logits).
    indices: ``[N, k]`` int64 vocabulary indices of ``values``.
    logsumexp: ``[N]`` float32.
    target_rank: int64, shape of ``targets`` (``None`` without targets).
    target_logprob: float32, shape of ``targets`` (``None`` without targets).
    """

    values: torch.Tensor
    indices: torch.Tensor
    logsumexp: torch.Tensor
    target_rank: torch.Tensor | None
    target_logprob: torch.Tensor | None


class TopKChecks:
    """Deferred validation for :func:`topk_rank`: calls record their device-side counters here
    instead of waiting for the device; :meth:`raise_if_any` reads them all with one sync and
    raises what the first bad call would have raised (rows numbered across the recorded calls).

    >>> checks = TopKChecks()
    >>> for step in range(steps):                       # no host sync inside the loop
    ...     res = topk_rank(logits_of(step), 20, checks=checks)
    >>> checks.raise_if_any()
    """

    def __init__(self) -> None:
        self._calls: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]] = []
        self.rows = 0

    def record(self, bad_rows: torch.Tensor, bad_targets: torch.Tensor | None, targets: torch.Tensor | None,
               vocab: int) -> None:
        """``bad_rows [n]`` nonzero where a row holds NaN/+inf; ``bad_targets [n]`` the count of
        targets outside ``[0, vocab)`` (or ``None`` when they were checked already)."""
        self._calls.append((bad_rows, bad_targets, targets, vocab))
        self.rows += bad_rows.shape[0]

    def raise_if_any(self) -> None:
        """Raise :class:`NonFiniteLogitsError` (NaN/+inf logits) or ``ValueError`` (a target
        outside the vocabulary) for the first bad recorded call, with one host sync when all is
        well; then forget the records."""
        calls, self._calls, self.rows = self._calls, [], 0
        if not calls:
            return
        flags = []
        for bad_rows, bad_targets, _, _ in calls:
            flag = bad_rows.to(torch.int32)
            flags.append(flag if bad_targets is None else flag | bad_targets)
        if not bool(torch.cat(flags).any()):  # the one sync
            return
        offset = 0
        for bad_rows, bad_targets, targets, vocab in calls:
            if bad_targets is not None:
                _raise_on_bad_targets(bad_targets, targets, vocab, offset)
            if bool(bad_rows.any()):
                rows = bad_rows.nonzero().flatten()
                count = sum(int((b != 0).sum()) for b, *_ in calls)
                raise NonFiniteLogitsError(int(rows[0]) + offset, count)
            offset += bad_rows.shape[0]


def topk_rank(
    logits: torch.Tensor,
    k: int,
    targets: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
    checks: TopKChecks | None = None,
) -> TopKRank:
    """Top-k, logsumexp and target ranks / log-probabilities of each row of ``logits``.

    Args:
        logits: ``[N, V]`` float16, bfloat16 or float32.
        k: number of top entries, ``1 ≤ k ≤ min(64, V)``.
        targets: optional integer tensor ``[N]`` (one target per row) or ``[N, M]`` (M per row),
            each in ``[0, V)``.
        backend: ``"auto"`` (CUDA → Triton; CPU → PyTorch, or Triton's interpreter when
            ``TRITON_INTERPRET=1``), ``"triton"`` or ``"torch"``.
        checks: a :class:`TopKChecks` to defer validation to (no host sync in this call), or
            ``None`` to raise here (one sync on the Triton path).

    Returns:
        :class:`TopKRank`; see the module docstring for the exact semantics. With deferred
        checks, the rank of a target outside ``[0, V)`` is −1 and its log-probability NaN until
        ``checks.raise_if_any()`` reports it.
    """
    squeeze_targets = _validate(logits, k, targets, check_range=False)
    device = check_same_device(logits=logits, targets=targets)
    impl = resolve_backend(backend, device)
    if impl == "torch" and targets is not None and targets.numel():
        _check_target_range(targets, logits.shape[1])  # the Triton kernel counts these itself
    if logits.shape[0] == 0:
        return _empty_result(logits, k, targets)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    target_matrix = None
    if targets is not None:
        target_matrix = targets.reshape(logits.shape[0], -1).to(torch.int64).contiguous()
    if impl == "triton":
        from deepalign.kernels.ranking_triton import topk_rank_triton

        values, indices, lse, rank, logprob, bad_rows, bad_targets = topk_rank_triton(logits, k, target_matrix)
        if target_matrix is None:
            bad_targets = None
    else:
        values, indices, lse, rank, logprob, bad_rows = topk_rank_reference(logits, k, target_matrix)
        bad_targets = None
    if checks is not None:
        checks.record(bad_rows, bad_targets, target_matrix, logits.shape[1])
    else:
        _raise_on_problems(bad_rows, bad_targets, target_matrix, logits.shape[1], squeeze_targets)
    if rank is not None and squeeze_targets:
        rank, logprob = rank.squeeze(1), logprob.squeeze(1)
    return TopKRank(values, indices, lse, rank, logprob)


def topk_rank_chunked(
    logits: torch.Tensor,
    k: int,
    targets: torch.Tensor | None = None,
    *,
    chunk_rows: int = 256,
    backend: Backend = "auto",
) -> TopKRank:
    """:func:`topk_rank` over logits of any leading shape ``[..., V]``, ``chunk_rows`` rows at a time.

    ``targets`` has shape ``[...]`` (one per position) or ``[..., M]``. Results keep the leading
    shape: ``values [..., k]``, ``logsumexp [...]``, ``target_rank`` like ``targets``. Working
    memory beyond the outputs is bounded by one chunk (e.g. ``[B, T, V]`` logits of a batch of
    sequences never get a float32 or key copy of their own).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor [..., V] with at least one dimension")
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    return topk_rank_rowwise(lambda rows: flat[rows], flat.shape[0], k, targets, lead,
                             chunk_rows=chunk_rows, backend=backend)


def topk_rank_rowwise(
    logits_of_rows: Callable[[slice], torch.Tensor],
    num_rows: int,
    k: int,
    targets: torch.Tensor | None,
    lead: torch.Size,
    *,
    chunk_rows: int,
    backend: Backend = "auto",
) -> TopKRank:
    """:func:`topk_rank` over ``num_rows`` rows whose logits ``logits_of_rows(rows) -> [n, V]``
    produces one slice of rows at a time (from a tensor, or computed on the fly from hidden
    states); results are shaped by the leading shape ``lead`` and by ``targets`` (``lead`` or
    ``lead + (M,)``). A NaN/+inf row is reported by its position in ``lead``."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    flat_targets = flatten_targets(targets, lead)
    pieces = []
    checks = TopKChecks()  # one host sync for the whole call, after the last chunk
    for start in range(0, max(num_rows, 1), chunk_rows):
        rows = slice(start, start + chunk_rows)
        chunk_targets = None if flat_targets is None else flat_targets[rows]
        pieces.append(topk_rank(logits_of_rows(rows), k, chunk_targets, backend=backend, checks=checks))
    try:
        checks.raise_if_any()
    except NonFiniteLogitsError as error:
        raise _locate_bad_row(error.row, lead) from None
    return concat_results(pieces, lead, None if targets is None else targets.shape)


def flatten_targets(targets: torch.Tensor | None, lead: torch.Size) -> torch.Tensor | None:
    """Check ``targets`` against the leading shape ``lead`` of some ``[..., V]`` logits and return
    them as ``[prod(lead), M]``. Accepted shapes: ``lead`` (M = 1) or ``lead + (M,)``."""
    if targets is None:
        return None
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.shape != lead and not (targets.dim() == len(lead) + 1 and targets.shape[:-1] == lead):
        raise ValueError(f"targets must have shape {tuple(lead)} or {tuple(lead)} + (M,) to match the logits' "
                         f"leading shape; got {tuple(targets.shape)}")
    per_row = targets.shape[-1] if targets.dim() > len(lead) else 1
    return targets.reshape(lead.numel(), per_row)


def concat_results(pieces: list[TopKRank], lead: torch.Size, target_shape: torch.Size | None) -> TopKRank:
    """Concatenate per-chunk results (rows in order) and reshape them to the leading shape ``lead``
    and, for the target fields, to ``target_shape``."""
    def cat(field: str) -> torch.Tensor:
        return torch.cat([getattr(piece, field) for piece in pieces])

    k = pieces[0].values.shape[-1]
    result = TopKRank(cat("values").reshape(*lead, k), cat("indices").reshape(*lead, k),
                      cat("logsumexp").reshape(lead), None, None)
    if target_shape is not None:
        result = result._replace(target_rank=cat("target_rank").reshape(target_shape),
                                 target_logprob=cat("target_logprob").reshape(target_shape))
    return result


def _empty_result(logits: torch.Tensor, k: int, targets: torch.Tensor | None) -> TopKRank:
    """The result for ``N = 0`` rows, with the documented shapes and dtypes."""
    device = logits.device
    result = TopKRank(logits.new_empty((0, k)), torch.empty((0, k), dtype=torch.int64, device=device),
                      torch.empty((0,), dtype=torch.float32, device=device), None, None)
    if targets is not None:
        result = result._replace(target_rank=torch.empty(targets.shape, dtype=torch.int64, device=device),
                                 target_logprob=torch.empty(targets.shape, dtype=torch.float32, device=device))
    return result


class NonFiniteLogitsError(ValueError):
    """A row of logits holds NaN or +inf. ``row`` is the first such row (flat row index)."""

    def __init__(self, row: int, count: int):
        self.row = row
        self.count = count
        more = f" (and {count - 1} other rows)" if count > 1 else ""
        super().__init__(f"logits row {row} contains NaN or +inf{more}; -inf is the only legal non-finite logit")


def _locate_bad_row(flat_row: int, lead: torch.Size) -> ValueError:
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_row), lead))
    return ValueError(f"logits at position {position} (flat row {flat_row}) contains NaN or +inf; "
                      f"-inf is the only legal non-finite logit")


def _validate(logits: torch.Tensor, k: int, targets: torch.Tensor | None, check_range: bool = True) -> bool:
    """Check arguments; return True when targets is 1-D (results are squeezed back to ``[N]``).
    ``check_range=False`` leaves the range of the targets to the kernel's counters (no sync)."""
    check_float_tensor("logits", logits, 2, "[N, V]")
    n_rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}], got {k}")
    if k > vocab:
        raise ValueError(f"k must be at most the vocabulary size V = {vocab}, got {k}")
    if targets is None:
        return False
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.dim() not in (1, 2) or targets.shape[0] != n_rows:
        raise ValueError(f"targets must have shape [N] or [N, M] with N = {n_rows}, got {tuple(targets.shape)}")
    if targets.dim() == 2 and targets.shape[1] == 0:
        raise ValueError("targets has M = 0 targets per row; pass targets=None instead")
    if check_range and targets.numel():
        _check_target_range(targets, vocab)
    return targets.dim() == 1


def _check_target_range(targets: torch.Tensor, vocab: int, row_offset: int = 0) -> None:
    outside = (targets < 0) | (targets >= vocab)
    if bool(outside.any()):
        where = tuple(int(i) for i in outside.nonzero()[0])
        shown = [where[0] + row_offset, *where[1:]]
        raise ValueError(f"targets must lie in [0, {vocab}); targets{shown} = {int(targets[where])}")


def _raise_on_bad_targets(bad_targets: torch.Tensor, targets: torch.Tensor, vocab: int, row_offset: int,
                          one_d: bool = False) -> None:
    """Raise for the first target outside the vocabulary (``targets [n, M]``, the kernel's
    per-row counts ``bad_targets [n]``); rows are shown offset by ``row_offset``, as ``[row]``
    when the caller's targets were 1-D, else ``[row, column]``."""
    if bool((bad_targets != 0).any()):
        rows = (bad_targets != 0).nonzero().flatten()
        first = int(rows[0])
        column = int(((targets[first] < 0) | (targets[first] >= vocab)).nonzero()[0])
        where = [first + row_offset] if one_d else [first + row_offset, column]
        raise ValueError(f"targets must lie in [0, {vocab}); targets{where} = {int(targets[first, column])}")


def _raise_on_problems(bad_rows: torch.Tensor, bad_targets: torch.Tensor | None, targets: torch.Tensor | None,
                       vocab: int, one_d: bool = False) -> None:
    """One sync for both counters; the errors themselves are built only on failure."""
    flag = bad_rows.to(torch.int32)
    if bad_targets is not None:
        flag = flag | bad_targets
    if flag.numel() and bool(flag.any()):
        if bad_targets is not None:
            _raise_on_bad_targets(bad_targets, targets, vocab, 0, one_d)
        _raise_on_bad_rows(bad_rows)


def _raise_on_bad_rows(bad_rows: torch.Tensor) -> None:
    """``bad_rows``: ``[N]``, nonzero where a row holds NaN/+inf (either implementation)."""
    if bad_rows.numel() and bool(bad_rows.any()):
        rows = bad_rows.nonzero().flatten()
        raise NonFiniteLogitsError(int(rows[0]), int(rows.numel()))


def topk_rank_reference(
    logits: torch.Tensor, k: int, targets: torch.Tensor | None, *, chunk_elements: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """PyTorch implementation with the kernel's semantics (the CPU path).

    ``targets`` is ``[N, M]`` int64 or ``None``. Works on ``chunk_elements // V`` rows at a time
    to bound its float32 copy and masks. Returns ``(values, indices, logsumexp, rank, logprob,
    bad_rows)`` where ``bad_rows[n]`` is nonzero exactly when row ``n`` holds a NaN or +inf.

    Top-k: ``torch.topk`` finds the k largest values, ``τ`` the k-th. When exactly k entries are
    ``≥ τ`` that set is the answer; otherwise (ties across the cut, rare) every entry ``> τ`` is
    kept and the lowest-indexed entries ``== τ`` fill the remaining places. A stable descending
    sort of the k chosen entries, taken in ascending index order, gives the order. Rank:
    ``#{x_v > x_t} + #{v < t : x_v == x_t}``. NaN / +inf rows are found from the logsumexp (NaN
    or +inf exactly for such rows, since it is computed stably), so they cost no extra pass.
    """
    n_rows, vocab = logits.shape
    rows_per_chunk = max(1, chunk_elements // vocab)
    index = torch.arange(vocab, device=logits.device)
    values, indices, lse, bad, rank, logprob = [], [], [], [], [], []
    for start in range(0, n_rows, rows_per_chunk):
        x = logits[start:start + rows_per_chunk]
        x32 = x.to(torch.float32)
        row_lse = torch.logsumexp(x32, dim=1)
        row_bad = ~(row_lse < float("inf"))
        if bool(row_bad.any()):  # the caller raises; keep the selection below well-defined
            x32 = torch.where(row_bad[:, None], 0.0, x32)
        top_indices = _select_topk(x32, k)
        values.append(x.gather(1, top_indices))
        indices.append(top_indices)
        lse.append(row_lse)
        bad.append(row_bad)
        if targets is not None:
            t = targets[start:start + rows_per_chunk]
            target_x = x32.gather(1, t)
            counts = [(x32 > target_x[:, m:m + 1]).sum(dim=1)
                      + ((x32 == target_x[:, m:m + 1]) & (index < t[:, m:m + 1])).sum(dim=1)
                      for m in range(t.shape[1])]
            rank.append(torch.stack(counts, dim=1))
            logprob.append(_target_logprob(target_x, row_lse))
    cat = torch.cat
    if targets is None:
        return cat(values), cat(indices), cat(lse), None, None, cat(bad)
    return cat(values), cat(indices), cat(lse), cat(rank), cat(logprob), cat(bad)


def _select_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[n, k]`` of the k first entries of each row of float32 ``x`` in the order
    "value descending, lower index first" (see :func:`topk_rank_reference`)."""
    top = x.topk(k, dim=1)
    threshold = top.values[:, -1:]
    at_least = x >= threshold
    chosen = top.indices.sort(dim=1).values
    crowded = at_least.sum(dim=1) > k
    if bool(crowded.any()):
        rows = crowded.nonzero().flatten()
        greater = x[rows] > threshold[rows]
        tied = x[rows] == threshold[rows]
        tied_taken = tied & (tied.cumsum(dim=1) <= k - greater.sum(dim=1, keepdim=True))
        chosen[rows] = (greater | tied_taken).nonzero()[:, 1].view(-1, k)
    order = x.gather(1, chosen).sort(dim=1, descending=True, stable=True).indices
    return chosen.gather(1, order)


def _target_logprob(target_logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``x_t − logsumexp``, with ``-inf`` (probability 0) wherever ``x_t`` is ``-inf``."""
    logprob = target_logits - lse[:, None]
    return torch.where(target_logits == float("-inf"), float("-inf"), logprob)
