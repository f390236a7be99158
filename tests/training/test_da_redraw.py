"""DA's prefill length k is drawn afresh every time a safety example is used (Qi et al., ICLR 2025).

The definition: each use of a safety example (prompt x, harmful response h, refusal r) is, with
probability p, ``x + h[:k] + r`` with ``k ~ U{1, …, min(100, |h|)}``, otherwise ``x + r``; p is
½ in the paper and ``augment_probability`` here (of ``SafetyRecoveryAugmenter`` and ``DARecipe``).
Nothing about k is remembered between uses. The tests sample one row many times through
``DARecipe.sample`` (the path the trainer takes) with p = 0.3, and check: the share of augmented
uses is p within a binomial 4-sigma bound; k takes every value of its support, each use's prefill
is exactly the first k harmful tokens, and the k counts are uniform (a chi-square bound at
z = 4 from the Wilson–Hilferty approximation, and a per-value 4.5-sigma bound). The seeds are
fixed, so the tests are deterministic.
"""

from __future__ import annotations

import collections
import math
import random

from deepalign.data.rows import SafetyExample, UtilityExample
from deepalign.training.augmentation import SafetyRecoveryAugmenter
from deepalign.training.recipes import DARecipe


def harmful_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chi_square_bound(df: int, z: float = 4.0) -> float:
    """Upper quantile of χ²(df) at the normal quantile z (Wilson–Hilferty)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def check_uniform(ks: list[int], support: int):
    counts = collections.Counter(ks)
    assert set(counts) == set(range(1, support + 1)), f"k outside or missing from 1..{support}: {sorted(counts)}"
    n = len(ks)
    expected = n / support
    chi2 = sum((counts[k] - expected) ** 2 / expected for k in range(1, support + 1))
    assert chi2 < chi_square_bound(support - 1), f"chi-square {chi2:.1f} for {support - 1} dof over {n} draws"
    sigma = math.sqrt(n * (1 / support) * (1 - 1 / support))
    worst = max(abs(counts[k] - expected) for k in range(1, support + 1))
    assert worst < 4.5 * sigma, f"a k value is {worst:.0f} draws off its expected {expected:.1f}"


def rows(world):
    items = world.harmful_items()[:2]
    safety = [SafetyExample(world.request(i), world.compliant_response(i), world.refusal(i)) for i in items]
    utility = [UtilityExample("how do i make tea ?", world.compliant_response("tea"))]
    return safety, utility


def test_one_row_used_many_times_gets_a_fresh_k_each_time(world, tokenizer):
    p, uses = 0.3, 4000
    safety, utility = rows(world)
    row = safety[0]
    harmful = harmful_ids(tokenizer, row.harmful_response)
    refusal = harmful_ids(tokenizer, row.refusal)
    assert 10 < len(harmful) < 100  # so k ~ U{1..|h|}
    recipe = DARecipe(tokenizer, [row], utility, safety_fraction=1.0, augment_probability=p)
    rng = random.Random(1234)
    ks = []
    for _ in range(uses // 4):
        for item in recipe.sample(rng, 4):  # four uses of the same row per batch
            k = item.prefill_length
            assert list(item.spans.tokens("prefill")) == harmful[:k]  # exactly the first k tokens
            assert list(item.spans.tokens("response")) == refusal
            ks.append(k)
    augmented = [k for k in ks if k > 0]
    sigma = math.sqrt(uses * p * (1 - p))
    assert abs(len(augmented) - uses * p) < 4 * sigma, (len(augmented), uses * p, sigma)
    check_uniform(augmented, len(harmful))
    # Fresh every use, also within a batch: consecutive augmented uses mostly differ.
    repeats = sum(a == b for a, b in zip(augmented, augmented[1:]))
    assert repeats < 3 * len(augmented) / len(harmful)


def test_two_rows_each_get_fresh_draws(world, tokenizer):
    """With two rows in the pool, each row's own k sequence varies (not one k per row)."""
    safety, utility = rows(world)
    recipe = DARecipe(tokenizer, safety, utility, safety_fraction=1.0, augment_probability=0.5)
    rng = random.Random(7)
    per_row = collections.defaultdict(list)
    for _ in range(300):
        for item in recipe.sample(rng, 4):
            per_row[item.spans.tokens("response")].append(item.prefill_length)
    assert len(per_row) == 2
    for row in safety:
        ks = per_row[tuple(harmful_ids(tokenizer, row.refusal))]
        support = len(harmful_ids(tokenizer, row.harmful_response))
        distinct = set(k for k in ks if k)
        assert len(distinct) > 0.9 * support, (support, sorted(distinct))
        assert 0 in ks


def test_k_is_capped_at_100_and_uniform_below(world, tokenizer):
    """|h| > 100: k ~ U{1..100}; every use augmented (p = 1) through the augmenter directly."""
    long_harmful = " , ".join(["heat oil"] * 60)  # 179 tokens
    assert len(harmful_ids(tokenizer, long_harmful)) > 100
    example = SafetyExample(world.request(world.harmful_items()[0]), long_harmful, "sorry , no .")
    augmenter = SafetyRecoveryAugmenter(tokenizer, augment_probability=1.0)
    rng = random.Random(99)
    ks = [augmenter.safety(example, rng).prefill_length for _ in range(5000)]
    check_uniform(ks, 100)


def test_the_default_probability_is_one_half(world, tokenizer):
    safety, utility = rows(world)
    recipe = DARecipe(tokenizer, safety[:1], utility, safety_fraction=1.0)
    rng = random.Random(3)
    uses = 2000
    augmented = sum(item.prefill_length > 0 for _ in range(uses // 4) for item in recipe.sample(rng, 4))
    assert abs(augmented - uses / 2) < 4 * math.sqrt(uses / 4)
