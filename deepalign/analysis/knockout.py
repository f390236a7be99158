"""Attention knockout: does a harmful answer need to read itself?

PRESTO (Vega & Singh) trains a model to look away from harmful prefill tokens. It can only cut RAP
where the harmful continuation is *carried* by that attention. Attention knockout (as in Geva et
al.'s "Dissecting recall", 2023) measures how much it is: in chosen layers, every response query is
forbidden to read the earlier response tokens (its own position stays readable), by setting those
attention scores to ``−inf`` before the softmax through TransformerLens's
``blocks.{l}.attn.hook_attn_scores``; then the correct harmful answer is teacher-forced and each
token's rank is read:

``rank_t = #{v : z_t[v] > max_{a ∈ C_t} z_t[a]}`` with ``z_t`` the logits that predict response token
``y_t`` and ``C_t`` the tokens equally correct there (``{y_t}`` unless ``alternatives`` says more: where
an answer chooses freely, as world version 2's declaration of a material per place, every valid choice is
correct and the rank is that of the best-ranked one).

If the ranks barely move when the knockout covers every layer after the first, the later layers'
reading of the prefill carries little of the harmful answer, and a penalty on that attention has
little to remove.
"""

from __future__ import annotations

from typing import Sequence

import torch

from deepalign.models.chat import encode_text, render_chat


def response_knockout(length: int, response: slice) -> torch.Tensor:
    """Bool ``[T, T]``, True where query ``i`` may not read key ``j``: both are response positions
    and ``j < i`` (a response query keeps its own position and every prompt token)."""
    if not 0 <= response.start <= response.stop <= length:
        raise ValueError(f"response span {response} does not fit a sequence of {length} tokens")
    inside = torch.zeros(length, dtype=torch.bool)
    inside[response] = True
    earlier = torch.ones(length, length, dtype=torch.bool).tril(diagonal=-1)
    return inside[:, None] & inside[None, :] & earlier


def best_correct_rank(logits: torch.Tensor, targets: torch.Tensor,
                      alternatives: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """``rank_t = #{v : logits[t, v] > max_{a ∈ C_t} logits[t, a]}`` (int64 ``[R]``) for logits
    ``[R, V]`` and targets ``[R]``; ``C_t = {targets[t]} ∪ alternatives[t]`` (``alternatives``: one
    sequence of token ids per row, or ``None``)."""
    best = logits.gather(1, targets[:, None])[:, 0]
    if alternatives is not None:
        if len(alternatives) != len(targets):
            raise ValueError(f"alternatives has {len(alternatives)} rows for {len(targets)} targets")
        best = torch.stack([torch.max(best[t], logits[t, list(ids)].max()) if len(ids) else best[t]
                            for t, ids in enumerate(alternatives)])
    return (logits > best[:, None]).sum(-1)


@torch.no_grad()
def knockout_ranks(bridge, prompt: str, response: str | Sequence[int], layers: Sequence[int],
                   alternatives: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Ranks ``[R]`` (int64, 0 = top) of each token of ``response`` teacher-forced after ``prompt``
    when, in ``layers``, response queries may not read earlier response tokens (see the module
    docstring). ``layers=()`` gives the plain ranks. ``alternatives``: per response token, the ids
    equally correct there (:func:`best_correct_rank`). ``bridge``: a TransformerLens
    ``TransformerBridge`` (:func:`deepalign.analysis.attention.load_bridge`)."""
    tokenizer = bridge.tokenizer
    tokens = encode_text(tokenizer, response) if isinstance(response, str) else list(response)
    if not tokens:
        raise ValueError("response is empty")
    n_layers = bridge.cfg.n_layers
    bad = [layer for layer in layers if not 0 <= int(layer) < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers")
    spans = render_chat(tokenizer, prompt, response=tokens, close_turn=False)
    ids = torch.tensor([spans.input_ids], device=bridge.cfg.device)
    blocked = response_knockout(len(spans), spans.response).to(ids.device)

    def knock_out(scores, hook):  # scores [1, H, T, T], before the softmax
        return scores.masked_fill(blocked, float("-inf"))

    hooks = [(f"blocks.{int(layer)}.attn.hook_attn_scores", knock_out) for layer in layers]
    logits = bridge.run_with_hooks(ids, fwd_hooks=hooks)[0].float()
    predicting = logits[spans.response.start - 1: spans.response.stop - 1]  # [R, V]
    targets = torch.tensor(tokens, device=predicting.device)
    return best_correct_rank(predicting, targets, alternatives).cpu()


def knockout_ranks_over(bridge, pairs: Sequence[tuple[str, str]], layers: Sequence[int],
                        alternatives: Sequence[Sequence[Sequence[int]] | None] | None = None) -> torch.Tensor:
    """:func:`knockout_ranks` of every (prompt, harmful answer) pair, concatenated (int64 ``[ΣR]``);
    ``alternatives``: one per pair (or ``None``)."""
    if not pairs:
        raise ValueError("pairs is empty")
    alternatives = alternatives if alternatives is not None else [None] * len(pairs)
    return torch.cat([knockout_ranks(bridge, prompt, answer, layers, alts)
                      for (prompt, answer), alts in zip(pairs, alternatives, strict=True)])
