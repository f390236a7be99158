"""Along a harmful continuation: ranks, sharpness, PFA-1, and per-position KL between two models.

* :func:`continuation_ranks`: at every position of a (teacher-forced) harmful response, the rank of
  the harmful next token, the rank of the best refusal token (the lowest rank among a set of
  refusal token ids), the entropy of the next-token distribution and its top-k mass (sharpness).
  All ranks come from the fused :func:`deepalign.kernels.topk_rank`.
* :func:`pfa1_by_prefill_length`: PFA-1 between a reference model's first-token distribution
  without prefill and a model's next-token distribution after ``n`` harmful tokens, for each ``n``.
* :func:`per_position_kl`: ``KL(p_a ‖ p_b)`` at every response position (Qi et al., Fig. 1), with
  each model's own chat template and the response tokens aligned, so two models with different
  templates are compared on the same response tokens; the models must share a tokenizer vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from deepalign.analysis.ranks import pfa1_score
from deepalign.kernels import topk_rank
from deepalign.models.chat import encode_text, render_chat


@dataclass(frozen=True)
class ContinuationProfile:
    """Per response position (tensors of length ``R``, the response length)."""

    harmful_rank: torch.Tensor  # int64, rank of the actual harmful token (0 = top)
    refusal_rank: torch.Tensor  # int64, best rank of any refusal token
    entropy: torch.Tensor  # float32, nats
    topk_mass: torch.Tensor  # float32, probability of the top k tokens


def _response_logits(model, tokenizer, prompt: str, response: Sequence[int], system: str | None = None):
    """Logits ``[R, V]`` that predict each response token, with the model's own template."""
    spans = render_chat(tokenizer, prompt, response=list(response), close_turn=False, system=system)
    device = next(model.parameters()).device
    logits = model(torch.tensor([spans.input_ids], device=device)).logits[0]
    return logits[spans.response.start - 1: spans.response.stop - 1].float()


@torch.no_grad()
def continuation_ranks(model, tokenizer, prompt: str, harmful_response: str, refusal_tokens: Sequence[int], *,
                       k: int = 20) -> ContinuationProfile:
    response = encode_text(tokenizer, harmful_response)
    if not response:
        raise ValueError("harmful_response is empty")
    if not refusal_tokens:
        raise ValueError("refusal_tokens is empty")
    logits = _response_logits(model, tokenizer, prompt, response)
    refusal = torch.tensor(list(refusal_tokens), device=logits.device)
    targets = torch.cat([torch.tensor(response, device=logits.device)[:, None],
                         refusal[None, :].expand(len(response), -1)], dim=1)
    result = topk_rank(logits, k, targets)
    logprobs = torch.log_softmax(logits, dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    topk_mass = torch.exp(result.values.float() - result.logsumexp[:, None]).sum(-1)
    return ContinuationProfile(result.target_rank[:, 0].cpu(), result.target_rank[:, 1:].min(dim=1).values.cpu(),
                               entropy.cpu(), topk_mass.cpu())


@torch.no_grad()
def pfa1_by_prefill_length(model, reference, tokenizer, prompt: str, harmful_response: str,
                           lengths: Sequence[int], weights=None) -> dict[int, float]:
    """``{n: PFA-1}``: ρ_w between the reference's first-token distribution (no prefill) and the
    model's next-token distribution after the first ``n`` harmful tokens."""
    device = next(reference.parameters()).device
    first = render_chat(tokenizer, prompt, close_turn=False)
    reference_logits = reference(torch.tensor([first.input_ids], device=device)).logits[0, -1].float()
    harmful = encode_text(tokenizer, harmful_response)
    scores = {}
    for n in lengths:
        spans = render_chat(tokenizer, prompt, prefill=harmful[:n], close_turn=False)
        logits = model(torch.tensor([spans.input_ids], device=next(model.parameters()).device)).logits[0, -1].float()
        scores[n] = float(pfa1_score(reference_logits.cpu(), logits.cpu(), weights))
    return scores


@torch.no_grad()
def per_position_kl(model_a, tokenizer_a, model_b, tokenizer_b, prompt: str, response: str, *,
                    system_a: str | None = None, system_b: str | None = None) -> torch.Tensor:
    """``KL(p_a ‖ p_b)`` in nats at each response position ``[R]``. The response is tokenised once
    (with ``tokenizer_a``) and placed after each model's own template; the two tokenizers must have
    the same vocabulary."""
    if tokenizer_a.get_vocab() != tokenizer_b.get_vocab():
        raise ValueError("the two models have different tokenizers; per-position KL needs the same vocabulary")
    tokens = encode_text(tokenizer_a, response)
    if not tokens:
        raise ValueError("response is empty")
    log_a = torch.log_softmax(_response_logits(model_a, tokenizer_a, prompt, tokens, system_a), dim=-1).cpu()
    log_b = torch.log_softmax(_response_logits(model_b, tokenizer_b, prompt, tokens, system_b), dim=-1).cpu()
    return (log_a.exp() * (log_a - log_b)).sum(-1).clamp_min(0.0)
