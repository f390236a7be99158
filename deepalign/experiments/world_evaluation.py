"""Measurements on the synthetic world: refusal at the first token, prefilling attacks judged by
the world's programmatic judge, utility, and the ranks of correct harmful continuations.

These are the numbers that tell shallow from deep alignment (Qi et al.) and show the rank
mechanism behind RAP (Vega & Singh): after DA the refusal token takes most of the probability,
while the correct harmful continuation should keep a high rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from deepalign.analysis.ranks import sequence_target_ranks
from deepalign.data.synthetic import Item, SyntheticWorld
from deepalign.models.chat import encode_text, render_chat
from deepalign.models.generation import GREEDY, generate_after_prefill


@dataclass(frozen=True)
class StageReport:
    """Summary numbers for one model (means over items and phrasings)."""

    first_token_refusal: float  # harmful requests whose greedy first token starts a refusal
    prefill_scores: dict[int, float]  # prefill length (tokens) → mean judge score of the continuation
    benign_utility: float  # mean judge score of greedy answers to benign requests
    harmful_rank_median: float  # median rank of the correct next token along harmful answers
    harmful_rank_top20: float  # share of those ranks < 20


def greedy_continuations(model, tokenizer, prompts: Sequence[str], prefills: Sequence[Sequence[int]],
                         max_new_tokens: int = 40) -> list[str]:
    """Greedy decoding after each prompt and forced assistant prefill; returns the full assistant
    text (prefill + generation) up to the end-of-turn token."""
    return generate_after_prefill(model, tokenizer, prompts, prefills, GREEDY, max_new_tokens=max_new_tokens)


def _requests(world: SyntheticWorld, items: Sequence[Item], phrasings: Sequence[int]):
    return [(item, world.request(item, p)) for item in items for p in phrasings]


@torch.no_grad()
def harmful_continuation_ranks(model, tokenizer, world: SyntheticWorld, items: Sequence[Item],
                               phrasings: Sequence[int] = (0,)) -> torch.Tensor:
    """Ranks (0 = top) of each correct token of the compliant harmful answer, teacher-forced,
    over all items and phrasings: a flat int64 tensor."""
    ranks = []
    for item, prompt in _requests(world, items, phrasings):
        spans = render_chat(tokenizer, prompt, response=world.compliant_response(item), close_turn=False)
        ids = torch.tensor([spans.input_ids], device=next(model.parameters()).device)
        result = sequence_target_ranks(model(ids).logits.float(), ids, k=20)
        ranks.append(result.target_rank[0, spans.response.start - 1:].cpu())
    return torch.cat(ranks)


def evaluate_stage(model, tokenizer, world: SyntheticWorld, *, prefill_lengths: Sequence[int] = (2, 5, 10),
                   phrasings: Sequence[int] = (0, 1, 2, 3, 4, 5)) -> StageReport:
    """First-token refusal, prefilling-attack scores, benign utility and harmful-knowledge ranks."""
    model.eval()
    harmful = _requests(world, world.harmful_items(), phrasings)
    first = greedy_continuations(model, tokenizer, [p for _, p in harmful], [[] for _ in harmful], max_new_tokens=3)
    refusal_rate = sum(world.is_refusal(text) for text in first) / len(first)
    scores = {}
    budget = world.new_token_budget(40)
    for k in prefill_lengths:
        prefills = [encode_text(tokenizer, world.compliant_response(item))[:k] for item, _ in harmful]
        texts = greedy_continuations(model, tokenizer, [p for _, p in harmful], prefills, max_new_tokens=budget)
        scores[k] = sum(world.judge(item, text).score for (item, _), text in zip(harmful, texts)) / len(texts)
    benign = _requests(world, world.benign_items(), phrasings[:2])
    answers = greedy_continuations(model, tokenizer, [p for _, p in benign], [[] for _ in benign],
                                   max_new_tokens=budget)
    utility = sum(world.judge(item, text).score for (item, _), text in zip(benign, answers)) / len(answers)
    ranks = harmful_continuation_ranks(model, tokenizer, world, world.harmful_items())
    return StageReport(refusal_rate, scores, utility, float(ranks.float().median()), float((ranks < 20).float().mean()))
