"""KnowledgeReplay: a share of each batch is plain knowledge text, the rest the wrapped recipe's.

The definition: of a batch of B, round(B · share) rows (at most B − 1) are ``<bos> text`` drawn
uniformly with replacement from the texts, with the loss on every text token and no prefill; the
other rows are the wrapped recipe's own sample of that size. Loss terms, name and normalisation are
the wrapped recipe's.
"""

from __future__ import annotations

import collections
import random

import pytest

from deepalign.data.rows import SafetyExample, UtilityExample
from deepalign.training.recipes import DARecipe, KnowledgeReplay


def da_recipe(world, tokenizer):
    items = world.harmful_items()[:2]
    safety = [SafetyExample(world.request(i), world.compliant_response(i), world.refusal(i)) for i in items]
    utility = [UtilityExample(world.request(i), world.compliant_response(i)) for i in world.benign_items()[:2]]
    return DARecipe(tokenizer, safety, utility)


def plain_ids(tokenizer, text):
    return (tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("batch_size,share,n_texts", [(16, 0.5, 8), (16, 0.2, 3), (4, 0.2, 1), (2, 0.9, 1)])
def test_each_batch_holds_the_share_of_plain_texts(world, tokenizer, batch_size, share, n_texts):
    texts = world.pretraining_texts()[:5]
    recipe = KnowledgeReplay(da_recipe(world, tokenizer), tokenizer, texts, share)
    plain = {plain_ids(tokenizer, t): t for t in texts}
    rng = random.Random(0)
    for _ in range(20):
        batch = recipe.sample(rng, batch_size)
        assert len(batch) == batch_size
        replayed = [item for item in batch if tuple(item.spans.input_ids) in plain]
        assert len(replayed) == n_texts
        for item in replayed:  # loss on every text token, none on BOS, no prefill
            assert item.prefill_length == 0 and item.loss_mask.tolist() == [False] + [True] * (len(item.loss_mask) - 1)
        others = [item for item in batch if tuple(item.spans.input_ids) not in plain]
        assert all(item.spans.prompt.stop > 1 for item in others)  # chat rows: a rendered prompt


def test_texts_are_drawn_uniformly_with_replacement(world, tokenizer):
    texts = world.pretraining_texts()[:4]
    recipe = KnowledgeReplay(da_recipe(world, tokenizer), tokenizer, texts, 0.5)
    index = {plain_ids(tokenizer, t): k for k, t in enumerate(texts)}
    rng, counts, repeats = random.Random(1), collections.Counter(), 0
    for _ in range(400):
        drawn = [index[tuple(i.spans.input_ids)] for i in recipe.sample(rng, 8) if tuple(i.spans.input_ids) in index]
        counts.update(drawn)
        repeats += len(set(drawn)) < len(drawn)
    n = sum(counts.values())  # 1600 draws over 4 texts: each within 4.5 sigma of n/4
    sigma = (n * 0.25 * 0.75) ** 0.5
    assert all(abs(counts[k] - n / 4) < 4.5 * sigma for k in range(4)), counts
    assert repeats > 0  # with replacement: 4 draws of 4 texts repeat one most of the time


def test_the_wrapped_recipe_keeps_its_name_and_normalisation(world, tokenizer):
    inner = da_recipe(world, tokenizer)
    recipe = KnowledgeReplay(inner, tokenizer, ["a b c"], 0.5)
    assert (recipe.name, recipe.token_normalised) == (inner.name, getattr(inner, "token_normalised", False))


@pytest.mark.parametrize("share", [0.0, 1.0, -0.2, 1.5])
def test_a_share_outside_the_open_interval_is_refused(world, tokenizer, share):
    with pytest.raises(ValueError, match="replay share must be in"):
        KnowledgeReplay(da_recipe(world, tokenizer), tokenizer, ["a"], share)


def test_no_texts_is_refused(world, tokenizer):
    with pytest.raises(ValueError, match="at least one text"):
        KnowledgeReplay(da_recipe(world, tokenizer), tokenizer, [], 0.5)
