"""Rank matching: rank vectors, the top-weighted Spearman correlation ρ_w, PFA-1, target ranks.

Vega & Singh (2025) argue that safety alignment should match the *ranks* of a reference
distribution rather than its probabilities: KL divergence barely notices a harmful token moving
from rank 5 to rank 2 when the refusal token holds 99% of the mass, but a rank correlation does.
With ``p = [.99, .004, .003, .002, .001]``, ``p1 = [.99, .001, .002, .003, .004]`` and
``p2 = [.6, .2, .1, .06, .04]``, ``KL(p‖p1) ≈ 0.0046 < KL(p‖p2) ≈ 0.4591`` while the plain
Spearman correlations are ``ρ(p, p1) = 0`` and ``ρ(p, p2) = 1``.

Definitions used here:

* ``rank_vector(s)``: 1-based ranks in *descending* order of the scores (the most likely token has
  rank 1), ties given the average of the ranks they span (as ``scipy.stats.rankdata`` does).
* ``weighted_spearman(a, b, w)``: the weighted Pearson correlation of the rank vectors
  ``R = rank_vector(a)`` and ``S = rank_vector(b)``::

      ρ_w = Σ_v w_v (R_v − R̄)(S_v − S̄) / sqrt(Σ_v w_v (R_v − R̄)² · Σ_v w_v (S_v − S̄)²),
      R̄ = Σ_v w_v R_v / Σ_v w_v,  S̄ likewise.

  With equal weights it is Spearman's ρ. The default weights are *top-heavy*, reciprocal ranks of
  the first (reference) argument, ``w_v = 1 / R_v``, so that disagreements among the reference's
  leading tokens cost more than shuffles in its tail. Any non-negative weights may be passed
  instead (``"uniform"`` for Spearman's ρ). The weighting the paper used is not stated in the
  material available to us; this choice is ours and is kept explicit for that reason.
* ``pfa1_score(reference, model)``: ``ρ_w(R(p*(x)), R(p(x, x_pre)))``, the weighted rank
  correlation between a reference model's first-token distribution without prefill and the
  model's next-token distribution after a harmful prefill ``x_pre``. 1 means the model ranks its
  next tokens after the prefill exactly as the reference ranks its first tokens (e.g. refusal
  tokens first); values near 0 or below mean the prefill reorders them.

Target ranks (the rank of each actual next token along sequences) come from the fused
:func:`deepalign.kernels.topk_rank` kernel, in chunks so memory stays bounded.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from deepalign.kernels import TopKRank, topk_rank_chunked
from deepalign.kernels.ranking import topk_rank_rowwise
from deepalign.kernels._dispatch import Backend

WeightSpec = Literal["reciprocal", "uniform"] | torch.Tensor | None


def rank_vector(scores: torch.Tensor) -> torch.Tensor:
    """1-based descending ranks along the last dimension, ties averaged.

    ``scores``: ``[..., V]`` real tensor (probabilities, log-probabilities or logits; any strictly
    increasing transform gives the same ranks). Returns float64 ``[..., V]``. The entries tied
    with ``x`` occupy ranks ``V − right + 1 … V − left`` where ``left``/``right`` are the
    ``searchsorted`` positions of ``x`` in the ascending sort; the rank is their mean.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1 or scores.shape[-1] == 0:
        raise ValueError("scores must be a tensor [..., V] with V ≥ 1")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"scores must be real, got {scores.dtype}")
    values = scores.to(torch.float64)
    if torch.isnan(values).any():
        raise ValueError("scores contain NaN; ranks are undefined")
    vocab = values.shape[-1]
    ascending = values.sort(dim=-1).values.contiguous()
    left = torch.searchsorted(ascending, values.contiguous(), side="left").to(torch.float64)
    right = torch.searchsorted(ascending, values.contiguous(), side="right").to(torch.float64)
    return (2 * vocab - right - left + 1) / 2


def resolve_weights(weights: WeightSpec, reference_ranks: torch.Tensor) -> torch.Tensor:
    """Turn a weight spec into float64 weights broadcastable to ``reference_ranks [..., V]``.

    ``"reciprocal"`` or ``None`` (the default): ``1 / R_v`` of the reference ranks. ``"uniform"``:
    all ones. A tensor: used as given after checking it is non-negative, finite, broadcastable
    and not all zero.
    """
    if weights is None or (isinstance(weights, str) and weights == "reciprocal"):
        return 1.0 / reference_ranks
    if isinstance(weights, str) and weights == "uniform":
        return torch.ones_like(reference_ranks)
    if not isinstance(weights, torch.Tensor):
        raise ValueError(f"weights must be 'reciprocal', 'uniform', None or a tensor, got {weights!r}")
    w = weights.to(device=reference_ranks.device, dtype=torch.float64)
    try:
        w = torch.broadcast_to(w, reference_ranks.shape)
    except RuntimeError:
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not broadcast to the ranks' "
                         f"shape {tuple(reference_ranks.shape)}") from None
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    if (w.sum(dim=-1) == 0).any():
        raise ValueError("weights sum to zero along the vocabulary for some row")
    return w


def weighted_spearman(a: torch.Tensor, b: torch.Tensor, weights: WeightSpec = None) -> torch.Tensor:
    """ρ_w between the rank vectors of ``a`` and ``b`` (see the module docstring).

    ``a`` (the reference) and ``b``: ``[..., V]`` scores of the same shape. Returns float64
    ``[...]``. A row whose ranks have zero weighted variance (all tied) gives NaN, as Spearman's
    ρ is undefined there.
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = rank_vector(a), rank_vector(b.to(a.device))
    w = resolve_weights(weights, ra)
    total = w.sum(dim=-1, keepdim=True)
    da = ra - (w * ra).sum(dim=-1, keepdim=True) / total
    db = rb - (w * rb).sum(dim=-1, keepdim=True) / total
    cov = (w * da * db).sum(dim=-1)
    var = (w * da * da).sum(dim=-1) * (w * db * db).sum(dim=-1)
    return torch.where(var > 0, cov / var.clamp_min(1e-300).sqrt(), torch.full_like(cov, float("nan")))


def pfa1_score(reference_first_token: torch.Tensor, model_after_prefill: torch.Tensor,
               weights: WeightSpec = None) -> torch.Tensor:
    """PFA-1: ``ρ_w(R(p*(x)), R(p(x, x_pre)))``.

    ``reference_first_token``: ``[..., V]`` scores (probabilities or logits) of the reference
    model's first response token for prompt ``x`` without prefill. ``model_after_prefill``:
    ``[..., V]`` scores of the evaluated model's next token after prompt ``x`` and prefill
    ``x_pre``. Returns float64 ``[...]`` in ``[-1, 1]``; the weights follow the reference's ranks.
    """
    return weighted_spearman(reference_first_token, model_after_prefill, weights)


def sequence_target_ranks(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    k: int = 20,
    shift: bool = True,
    chunk_rows: int = 256,
    backend: Backend = "auto",
) -> TopKRank:
    """Rank and log-probability of every actual next token of a batch of sequences.

    ``logits``: ``[B, T, V]``; ``tokens``: ``[B, T]`` token ids. With ``shift=True`` (a causal
    LM's logits) position ``t`` is scored against ``tokens[:, t + 1]`` and the result has length
    ``T − 1``; with ``shift=False`` ``tokens`` are the targets of each position as given.
    Returns :class:`TopKRank` with ``values/indices [B, T', k]``, ``logsumexp [B, T']`` and
    ``target_rank/target_logprob [B, T']`` (rank 0 = the model's top token).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, T, V], got {tuple(logits.shape)}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens must have shape [B, T] = {tuple(logits.shape[:2])}, got {tuple(tokens.shape)}")
    if shift:
        logits, tokens = logits[:, :-1], tokens[:, 1:]
    return topk_rank_chunked(logits, k, tokens, chunk_rows=chunk_rows, backend=backend)


def target_ranks_from_hidden(
    hidden: torch.Tensor,
    unembed: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    *,
    k: int = 20,
    chunk_rows: int = 256,
    backend: Backend = "auto",
) -> TopKRank:
    """Target ranks from final hidden states, never holding more than ``chunk_rows`` rows of logits.

    ``hidden``: ``[..., D]``; ``unembed``: maps ``[n, D]`` to ``[n, V]`` logits (e.g. a model's
    ``lm_head``, with any final norm or softcap applied by the caller's function); ``targets``:
    ``[...]`` or ``[..., M]`` token ids. For long sequences and large vocabularies this avoids the
    ``[B, T, V]`` logits tensor entirely.
    """
    lead = hidden.shape[:-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])

    def logits_of_rows(rows: slice) -> torch.Tensor:
        with torch.no_grad():
            return unembed(flat_hidden[rows])

    return topk_rank_rowwise(logits_of_rows, flat_hidden.shape[0], k, targets, lead, chunk_rows=chunk_rows,
                             backend=backend)
