"""PRESTO's query positions, written out by hand (Vega & Singh, Eq. 3).

Eq. 3 sums, over heads and over the query positions ``i`` from the *first prefill token* to the *end
of the example*, ``Σ_{j∈prefill} a_ij − Σ_{j∉prefill} a_ij``. Here the batch is built from
hand-made spans of known lengths (left padding, a prompt, a prefill, a refusal, the end-of-turn
token), the query positions of every row are written as literal lists, and the expected penalty is
summed over exactly those positions from the attention probabilities that an eager model
materialises. Nothing here calls ``presto_query_mask`` to get the expected value.
"""

from __future__ import annotations

import pytest
import torch

from deepalign.data.rows import SafetyExample, UtilityExample
from deepalign.models.attention import collect_prefill_mass
from deepalign.models.chat import ChatSpans, collate
from deepalign.models.loading import tiny_random_model
from deepalign.training.augmentation import TrainingItem
from deepalign.training.losses import presto_penalty, presto_query_mask
from deepalign.training.recipes import DARecipe, make_batch

VOCAB = 64
PAD = 0

# (prompt, prefill, refusal) lengths; every row also has one end-of-turn token.
ROWS = [(4, 3, 3), (3, 1, 2), (3, 0, 3), (2, 2, 4)]
# Lengths 11, 7, 7, 9: left padding of 0, 4, 4, 2 in a batch of length 11.
#   row 0: prompt 0-3, prefill 4-6, refusal 7-9, end 10
#   row 1: pad 0-3, prompt 4-6, prefill 7, refusal 8-9, end 10
#   row 2: pad 0-3, prompt 4-6, (no prefill), refusal 7-9, end 10
#   row 3: pad 0-1, prompt 2-3, prefill 4-5, refusal 6-9, end 10
LEFT_PADDED_QUERIES = [[4, 5, 6, 7, 8, 9, 10], [7, 8, 9, 10], [], [4, 5, 6, 7, 8, 9, 10]]
LEFT_PADDED_PREFILL = [[4, 5, 6], [7], [], [4, 5]]
# The same rows right-padded (real tokens first, padding after the end of each row):
#   row 0: prompt 0-3, prefill 4-6, refusal 7-9, end 10
#   row 1: prompt 0-2, prefill 3, refusal 4-5, end 6, pad 7-10
#   row 2: prompt 0-2, refusal 3-5, end 6, pad 7-10
#   row 3: prompt 0-1, prefill 2-3, refusal 4-7, end 8, pad 9-10
RIGHT_PADDED_QUERIES = [[4, 5, 6, 7, 8, 9, 10], [3, 4, 5, 6], [], [2, 3, 4, 5, 6, 7, 8]]
SUPERVISED_TOKENS = (3 + 1) + (2 + 1) + (3 + 1) + (4 + 1)  # refusal + end of every row = 16


def hand_spans(seed: int = 0) -> list[ChatSpans]:
    gen = torch.Generator().manual_seed(seed)
    spans = []
    for prompt, prefill, refusal in ROWS:
        length = prompt + prefill + refusal + 1
        ids = tuple(int(i) for i in torch.randint(1, VOCAB, (length,), generator=gen))
        a, b, c = prompt, prompt + prefill, prompt + prefill + refusal
        spans.append(ChatSpans(ids, slice(0, a), slice(a, b), slice(b, c), slice(c, length)))
    return spans


def hand_items() -> list[TrainingItem]:
    return [TrainingItem(s, s.mask("response", "end"), s.prefill.stop - s.prefill.start) for s in hand_spans()]


def literal_mask(rows: list[list[int]], length: int = 11) -> torch.Tensor:
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for row, positions in enumerate(rows):
        mask[row, positions] = True
    return mask


@torch.no_grad()
def eq3_from_eager(model, batch, queries: list[list[int]]) -> list[torch.Tensor]:
    """Per layer: Σ_h Σ_{i in the hand-written positions} (Σ_{j∈prefill} a_ij − Σ_{j∉prefill} a_ij),
    from the probabilities that eager attention materialises."""
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        attentions = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_attentions=True).attentions
    finally:
        model.set_attn_implementation(implementation)
    prefill = batch["prefill_mask"].float()
    per_layer = []
    for probs in attentions:  # [B, H, T, T]
        total = probs.new_zeros(())
        for row, positions in enumerate(queries):
            for i in positions:
                inside = (probs[row, :, i, :] * prefill[row]).sum(-1)
                outside = (probs[row, :, i, :] * (1 - prefill[row])).sum(-1)
                total = total + (inside - outside).sum()
        per_layer.append(total)
    return per_layer


def test_the_batch_is_the_one_written_out_by_hand():
    batch = make_batch(hand_items(), PAD)
    assert batch["attention_mask"].tolist() == [[1] * 11, [0] * 4 + [1] * 7, [0] * 4 + [1] * 7, [0] * 2 + [1] * 9]
    assert batch["prefill_mask"].tolist() == literal_mask(LEFT_PADDED_PREFILL).tolist()
    assert int(batch["loss_mask"].sum()) == SUPERVISED_TOKENS


@pytest.mark.parametrize("left_pad", [True, False], ids=["left-padded", "right-padded"])
def test_query_positions_are_first_prefill_token_to_the_end(left_pad):
    batch = collate(hand_spans(), PAD, left_pad=left_pad)
    want = LEFT_PADDED_QUERIES if left_pad else RIGHT_PADDED_QUERIES
    got = presto_query_mask(batch["prefill_mask"], batch["attention_mask"])
    assert [torch.nonzero(row).flatten().tolist() for row in got] == want


@pytest.mark.parametrize("left_pad", [True, False], ids=["left-padded", "right-padded"])
def test_penalty_equals_eq3_over_the_hand_written_positions(left_pad):
    """The kernel's masses through ``presto_penalty`` equal Eq. 3 summed from eager probabilities
    over the literal positions (sum over layers by default; ``layer_mean`` divides by L = 2)."""
    model = tiny_random_model(vocab_size=VOCAB, attn_implementation="deepalign", seed=3)
    batch = collate(hand_spans(), PAD, left_pad=left_pad)
    queries = LEFT_PADDED_QUERIES if left_pad else RIGHT_PADDED_QUERIES
    want_layers = eq3_from_eager(model, batch, queries)
    with torch.no_grad(), collect_prefill_mass(batch["prefill_mask"], backend="torch") as collected:
        model(batch["input_ids"], attention_mask=batch["attention_mask"])
    masses = collected.stacked()
    query_mask = presto_query_mask(batch["prefill_mask"], batch["attention_mask"])
    penalty = presto_penalty(masses, query_mask, layer_mean=False)
    want = sum(want_layers)
    assert abs(float(penalty) - float(want)) < 1e-4, (float(penalty), float(want))
    assert abs(float(presto_penalty(masses, query_mask)) - float(want) / 2) < 1e-4  # the default: the mean
    # The same sum from the kernel's mass at the hand-written positions, Σ (2·mass − 1) per head.
    by_hand = sum(float((2 * masses[:, row, :, i] - 1).sum()) for row, positions in enumerate(queries)
                  for i in positions)
    assert abs(float(penalty) - by_hand) < 1e-4


def test_recipe_presto_term_uses_exactly_those_positions():
    """``DARecipe.loss_terms`` (the training path): its ``presto`` term is Eq. 3 over the literal
    positions divided by the 16 supervised tokens. One layer, so the value is the same whether the
    recipe sums or averages over layers."""
    model = tiny_random_model(vocab_size=VOCAB, layers=1, attn_implementation="deepalign", seed=4)
    batch = make_batch(hand_items(), PAD)
    (want,) = eq3_from_eager(model, batch, LEFT_PADDED_QUERIES)
    recipe = DARecipe(_NoTokenizer(), [SafetyExample("p", "h", "r")], [UtilityExample("p", "r")], presto_weight=1.0)
    with torch.no_grad():
        terms = recipe.loss_terms(model, batch)
    assert abs(float(terms["presto"]) * SUPERVISED_TOKENS - float(want)) < 1e-4, (
        float(terms["presto"]) * SUPERVISED_TOKENS, float(want))
    assert torch.allclose(terms["loss"].detach(), terms["nll"] + terms["presto"], atol=1e-6)


class _NoTokenizer:
    """loss_terms reads only the batch; the recipe's augmenter is never used here."""

    pad_token_id = PAD


def test_recipe_averages_over_layers_as_the_authors_do():
    """Two layers: by default the recipe's ``presto`` term is the mean of the per-layer Eq. 3 values
    (Vega & Singh's released code divides by the number of layers); ``presto_layer_mean=False`` sums."""
    model = tiny_random_model(vocab_size=VOCAB, layers=2, attn_implementation="deepalign", seed=5)
    batch = make_batch(hand_items(), PAD)
    per_layer = eq3_from_eager(model, batch, LEFT_PADDED_QUERIES)
    assert len(per_layer) == 2
    rows = ([SafetyExample("p", "h", "r")], [UtilityExample("p", "r")])
    with torch.no_grad():
        mean = DARecipe(_NoTokenizer(), *rows, presto_weight=1.0).loss_terms(model, batch)["presto"]
        total = DARecipe(_NoTokenizer(), *rows, presto_weight=1.0, presto_layer_mean=False).loss_terms(model, batch)["presto"]
    assert abs(float(mean) * SUPERVISED_TOKENS - float(sum(per_layer)) / 2) < 1e-4
    assert abs(float(total) * SUPERVISED_TOKENS - float(sum(per_layer))) < 1e-4


def test_the_authors_batch_mix_is_the_default(world, tokenizer):
    """4 safety + 16 utility examples per device in both authors' code: safety fraction 0.2."""
    import random

    from deepalign.training.augmentation import SafetyExample as Safety

    item = world.harmful_items()[0]
    recipe = DARecipe(tokenizer, [Safety(world.request(item), world.compliant_response(item), world.refusal(item))],
                      [UtilityExample(world.request(b), world.compliant_response(b)) for b in world.benign_items()])
    assert recipe.safety_fraction == 0.2
    items = recipe.sample(random.Random(0), 20)
    refusal = world.refusal(item)
    texts = [tokenizer.decode(list(i.spans.input_ids)) for i in items]
    assert len(items) == 20 and sum(refusal in " ".join(t.split()) for t in texts) == 4
