"""Rank matching: rank vectors with ties, ρ_w, PFA-1 and per-position target ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepalign.analysis.ranks import (
    pfa1_score,
    rank_vector,
    resolve_weights,
    sequence_target_ranks,
    target_ranks_from_hidden,
    weighted_spearman,
)
from deepalign.kernels import topk_rank
from tests.helpers import DEVICE

P = torch.tensor([0.99, 0.004, 0.003, 0.002, 0.001], dtype=torch.float64)
P1 = torch.tensor([0.99, 0.001, 0.002, 0.003, 0.004], dtype=torch.float64)
P2 = torch.tensor([0.6, 0.2, 0.1, 0.06, 0.04], dtype=torch.float64)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


def naive_average_ranks(x: list[float]) -> list[float]:
    """1-based descending ranks with ties averaged, by counting."""
    return [sum(y > v for y in x) + (sum(y == v for y in x) + 1) / 2 for v in x]


def test_paper_example_kl_versus_rank():
    """Vega & Singh: KL prefers p1 (a reversed tail) to p2 (the same order), rank correlation the opposite."""
    assert kl(P, P1) == pytest.approx(0.0046, abs=5e-5)
    assert kl(P, P2) == pytest.approx(0.4591, abs=5e-5)
    assert kl(P, P1) < kl(P, P2)
    assert weighted_spearman(P, P1, "uniform").item() == pytest.approx(0.0, abs=1e-12)
    assert weighted_spearman(P, P2, "uniform").item() == pytest.approx(1.0, abs=1e-12)
    # The top-heavy default agrees on p2 and, because the leading token matches, rates p1 above 0.
    assert weighted_spearman(P, P2).item() == pytest.approx(1.0, abs=1e-12)
    assert 0 < weighted_spearman(P, P1).item() < 1


@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40))
def test_rank_vector_averages_ties(values):
    got = rank_vector(torch.tensor(values, dtype=torch.float32))
    assert got.tolist() == pytest.approx(naive_average_ranks(values))
    assert got.sum().item() == pytest.approx(len(values) * (len(values) + 1) / 2)


@given(st.integers(0, 2**31 - 1), st.integers(2, 300), st.sampled_from(["reciprocal", "uniform", "random"]),
       st.booleans())
def test_rho_of_a_ranking_with_itself_is_one(seed, vocab, weights, ties):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, vocab, generator=gen)
    if ties:
        x = torch.round(x)
    w = torch.rand(vocab, generator=gen) + 0.01 if weights == "random" else weights
    rho = weighted_spearman(x, x, w)
    constant = (x == x[:, :1]).all(dim=1)
    assert torch.allclose(rho[~constant], torch.ones_like(rho[~constant]))
    assert torch.isnan(rho[constant]).all()
    # Any strictly increasing transform keeps the ranks, so ρ_w(x, f(x)) = 1 as well.
    assert torch.allclose(weighted_spearman(x, x.softmax(-1), w)[~constant], torch.ones(int((~constant).sum()),
                                                                                       dtype=torch.float64))


@given(st.integers(0, 2**31 - 1), st.integers(3, 60))
def test_uniform_weights_give_spearman(seed, vocab):
    """With equal weights ρ_w is Spearman's ρ: 1 − 6 Σ d² / (n (n² − 1)) for distinct values."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randperm(vocab, generator=gen).double(), torch.randperm(vocab, generator=gen).double()
    d = rank_vector(a) - rank_vector(b)
    expected = 1 - 6 * (d ** 2).sum() / (vocab * (vocab ** 2 - 1))
    assert weighted_spearman(a, b, "uniform").item() == pytest.approx(expected.item(), abs=1e-12)
    assert weighted_spearman(a, -a, "uniform").item() == pytest.approx(-1.0, abs=1e-12)


def test_top_heavy_weights_punish_head_disagreements_more():
    ref = torch.arange(10, 0, -1).double()
    swap_head = ref.clone()
    swap_head[[0, 1]] = swap_head[[1, 0]]
    swap_tail = ref.clone()
    swap_tail[[8, 9]] = swap_tail[[9, 8]]
    assert weighted_spearman(ref, swap_head, "uniform") == weighted_spearman(ref, swap_tail, "uniform")
    assert weighted_spearman(ref, swap_head) < weighted_spearman(ref, swap_tail)


def test_pfa1_is_rho_w_of_reference_and_prefilled():
    reference = torch.tensor([[5.0, 1.0, 0.5, -1.0, -2.0]])
    restored = torch.tensor([[4.0, 0.0, -0.5, -1.5, -3.0]])  # same order after the prefill
    hijacked = torch.tensor([[-3.0, 1.0, 0.5, -1.0, 6.0]])  # a harmful token jumps to the top
    assert pfa1_score(reference, restored).item() == pytest.approx(1.0)
    assert pfa1_score(reference, hijacked).item() < pfa1_score(reference, restored).item()
    assert pfa1_score(reference, hijacked).item() == weighted_spearman(reference, hijacked).item()


@pytest.mark.parametrize(
    "weights, message",
    [
        ("top", "weights must be 'reciprocal', 'uniform', None or a tensor"),
        (torch.tensor([1.0, -1.0, 1.0]), "finite and non-negative"),
        (torch.tensor([1.0, float("nan"), 1.0]), "finite and non-negative"),
        (torch.zeros(3), "sum to zero"),
        (torch.ones(4), r"do not broadcast to the ranks' shape \(3,\)"),
    ],
)
def test_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        resolve_weights(weights, rank_vector(torch.tensor([1.0, 2.0, 3.0])))


def test_bad_rank_inputs():
    with pytest.raises(ValueError, match="same shape"):
        weighted_spearman(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        rank_vector(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"\[\.\.\., V\] with V ≥ 1"):
        rank_vector(torch.ones(2, 0))


def test_sequence_target_ranks_scores_each_next_token():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 40, generator=gen)
    tokens = torch.randint(0, 40, (2, 6), generator=gen)
    result = sequence_target_ranks(logits.to(DEVICE), tokens.to(DEVICE), k=5, chunk_rows=4)
    assert result.target_rank.shape == (2, 5) and result.values.shape == (2, 5, 5)
    for b in range(2):
        for t in range(5):
            expected = topk_rank(logits[b, t:t + 1], 5, tokens[b, t + 1:t + 2], backend="torch")
            assert result.target_rank[b, t].item() == expected.target_rank.item()
            assert result.target_logprob[b, t].item() == pytest.approx(expected.target_logprob.item(), abs=1e-5)
    unshifted = sequence_target_ranks(logits, tokens, k=5, shift=False)
    assert unshifted.target_rank.shape == (2, 6)
    with pytest.raises(ValueError, match=r"tokens must have shape \[B, T\] = \(2, 6\)"):
        sequence_target_ranks(logits, tokens[:, :3])


def test_target_ranks_from_hidden_matches_full_logits():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 16, generator=gen)
    weight = torch.randn(90, 16, generator=gen)
    targets = torch.randint(0, 90, (3, 7, 2), generator=gen)
    calls = []

    def unembed(h):
        calls.append(h.shape[0])
        return h @ weight.T

    chunked = target_ranks_from_hidden(hidden, unembed, targets, k=8, chunk_rows=5)
    full = topk_rank(unembed(hidden.reshape(21, 16)), 8, targets.reshape(21, 2), backend="torch")
    assert max(calls[:-1]) <= 5  # never more than one chunk of logits at a time
    assert torch.equal(chunked.target_rank.reshape(21, 2), full.target_rank)
    assert torch.equal(chunked.indices.reshape(21, 8), full.indices)
    assert chunked.logsumexp.shape == (3, 7)
