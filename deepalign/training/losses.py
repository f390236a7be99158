"""Training losses, as the papers define them.

All token losses use the causal-LM convention: the logits at position ``t`` predict token
``t + 1``, and a loss mask ``[B, T]`` marks the *target* tokens that are supervised.

* :func:`token_nll`: summed negative log-likelihood of the supervised tokens and their count
  (SFT, safety-recovery DA and the utility anchor; the caller divides by the count of the whole
  batch, "a mean over all supervised tokens").
* :func:`presto_penalty`: PRESTO (Vega & Singh, Eq. 3),
  ``Σ_heads Σ_i (Σ_{j∈prefill} a_ij − Σ_{j∉prefill} a_ij) = Σ (2 · mass_i − 1)`` over the query
  positions ``i`` from the first prefill token to the end of the example, averaged over layers as
  the authors' released code does (``layer_mean=False`` sums over layers instead), computed from the
  fused kernel's ``mass`` (never from materialised attention). It is added with weight 1 to the DA
  loss and normalised by the same supervised-token count. (The authors' code also adds the constant
  ``H`` per position, which has no gradient.)
* :func:`constrained_token_loss`: the token-wise constrained objective (Qi et al., Eq. 3),
  ``−Σ_t (2/β_t) · log σ(β_t · (log π_θ(y_t|·) − log π_ref(y_t|·)))`` with ``β_1 = 0.5``,
  ``β_2..5 = 2``, ``β_t = 0.1`` after, ``t`` counting response tokens from 1. At ``π_θ = π_ref``
  its gradient is the SFT gradient, ``−Σ_t ∇ log π_θ(y_t|·)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``log p(input_ids[:, t] | prefix)`` for ``t ≥ 1`` in float32, aligned to targets:
    returns ``[B, T]`` with column 0 set to 0 (no prediction for the first token)."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(logprobs, (1, 0))


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(Σ −log p(y_t), count)`` over target positions where ``loss_mask [B, T]`` is True.

    ``logits [B, T, V]``, ``input_ids [B, T]``. Position 0 cannot be a target and must not be
    masked in."""
    if loss_mask.shape != input_ids.shape:
        raise ValueError(f"loss_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(loss_mask.shape)}")
    if loss_mask[:, 0].any():
        raise ValueError("loss_mask marks position 0, which no logit predicts")
    mask = loss_mask[:, 1:]
    nll = F.cross_entropy(logits[:, :-1][mask].float(), input_ids[:, 1:][mask], reduction="sum")
    return nll, int(mask.sum())


def presto_query_mask(prefill_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: real positions from each example's first prefill token to its end (all
    False for an example without prefill)."""
    has_prefill = prefill_mask.any(dim=1, keepdim=True)
    started = prefill_mask.long().cumsum(dim=1) > 0
    return started & has_prefill & attention_mask.bool()


def presto_penalty(masses: torch.Tensor, query_mask: torch.Tensor, *, layer_mean: bool = True) -> torch.Tensor:
    """``mean_layers Σ_heads Σ_{i in query_mask} (2 · mass − 1)`` (``layer_mean=False``: the sum
    over layers). The mean is Vega & Singh's normalisation (their released training code).

    ``masses``: ``[L, B, H, T]`` (from :func:`deepalign.models.collect_prefill_mass`);
    ``query_mask``: bool ``[B, T]`` (see :func:`presto_query_mask`). Returns a scalar (float32)."""
    if masses.dim() != 4 or masses.shape[1] != query_mask.shape[0] or masses.shape[3] != query_mask.shape[1]:
        raise ValueError(f"masses must be [L, B, H, T] matching query_mask {tuple(query_mask.shape)}, "
                         f"got {tuple(masses.shape)}")
    per_position = (2 * masses.float() - 1).sum(dim=2)  # [L, B, T]: Σ over heads
    penalty = (per_position * query_mask[None].float()).sum()
    return penalty / masses.shape[0] if layer_mean else penalty


def constrained_betas(response_index: torch.Tensor, *, beta_first: float = 0.5, beta_early: float = 2.0,
                      beta_late: float = 0.1, early_until: int = 5) -> torch.Tensor:
    """β_t for 1-based response positions ``t``: β_1 = 0.5, β_2..5 = 2, β_t = 0.1 after."""
    return torch.where(response_index <= 1, beta_first,
                       torch.where(response_index <= early_until, beta_early, beta_late)).float()


def response_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """1-based index of each supervised token within its example's supervised tokens (0 elsewhere)."""
    return loss_mask.long().cumsum(dim=1) * loss_mask.long()


def constrained_token_loss(policy_logprobs: torch.Tensor, reference_logprobs: torch.Tensor,
                           loss_mask: torch.Tensor, betas: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``(−Σ_t (2/β_t) log σ(β_t (log π_θ − log π_ref)), count)`` over ``loss_mask`` positions.

    ``policy_logprobs``, ``reference_logprobs``: ``[B, T]`` target log-probabilities (see
    :func:`target_logprobs`; the reference is detached). ``betas``: ``[B, T]``, default the paper's
    schedule over each example's supervised positions."""
    if betas is None:
        betas = constrained_betas(response_positions(loss_mask))
    margin = betas * (policy_logprobs - reference_logprobs.detach())
    loss = -(2.0 / betas) * F.logsigmoid(margin)
    return loss[loss_mask].sum(), int(loss_mask.sum())
