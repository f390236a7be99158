"""DA sampling and loss masks, PRESTO against Eq. 3 on eager attention, the constrained objective."""

from __future__ import annotations

import collections
import copy
import random

import pytest
import torch

from deepalign.models.attention import collect_prefill_mass
from deepalign.models.chat import collate
from deepalign.models.loading import tiny_random_model
from deepalign.training.augmentation import SafetyExample, SafetyRecoveryAugmenter, UtilityExample
from deepalign.training.losses import (
    constrained_betas,
    constrained_token_loss,
    presto_penalty,
    presto_query_mask,
    response_positions,
    target_logprobs,
    token_nll,
)


def safety_example(world, item_index=0):
    item = world.harmful_items()[item_index]
    return SafetyExample(world.request(item), world.compliant_response(item), world.refusal(item))


def test_da_prefill_length_is_uniform_and_half_the_time(world, tokenizer):
    augmenter = SafetyRecoveryAugmenter(tokenizer)
    example = safety_example(world)
    harmful_tokens = len(tokenizer(example.harmful_response, add_special_tokens=False)["input_ids"])
    rng = random.Random(0)
    counts = collections.Counter(augmenter.safety(example, rng).prefill_length for _ in range(6000))
    assert abs(counts[0] / 6000 - 0.5) < 0.03
    ks = {k: c for k, c in counts.items() if k}
    assert set(ks) == set(range(1, harmful_tokens + 1))  # every k in {1..|h|} (|h| < 100 here)
    expected = 3000 / harmful_tokens
    assert all(abs(c - expected) < 5 * expected ** 0.5 for c in ks.values())


def test_da_caps_k_at_max_prefill(tokenizer):
    augmenter = SafetyRecoveryAugmenter(tokenizer, max_prefill=3, augment_probability=1.0)
    rng = random.Random(1)
    assert {augmenter.prefill_length(50, rng) for _ in range(300)} == {1, 2, 3}


def test_da_loss_covers_refusal_and_end_only(world, tokenizer):
    augmenter = SafetyRecoveryAugmenter(tokenizer, augment_probability=1.0)
    example = safety_example(world)
    item = augmenter.safety(example, random.Random(2))
    spans = item.spans
    supervised = [tok for tok, on in zip(spans.input_ids, item.loss_mask.tolist()) if on]
    refusal = tokenizer(example.refusal, add_special_tokens=False)["input_ids"]
    assert supervised == refusal + [tokenizer.convert_tokens_to_ids("<|end|>")]
    assert item.prefill_length == spans.prefill.stop - spans.prefill.start > 0
    utility = augmenter.utility(UtilityExample("how do i make tea ?", world.compliant_response("tea")))
    assert utility.loss_mask.sum() == len(utility.spans.tokens("response")) + 1


def test_token_nll_matches_cross_entropy_and_rejects_bad_masks():
    gen = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 5, 7, generator=gen), torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    nll, count = token_nll(logits, ids, mask)
    manual = -sum(torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]] for b in range(2) for t in range(5) if mask[b, t])
    assert count == 6 and torch.allclose(nll, manual)
    assert torch.allclose(target_logprobs(logits, ids)[mask].sum(), -nll)
    with pytest.raises(ValueError, match="position 0"):
        token_nll(logits, ids, torch.ones(2, 5, dtype=torch.bool))


def da_batch(world, tokenizer, seed=3):
    augmenter = SafetyRecoveryAugmenter(tokenizer, augment_probability=1.0)
    rng = random.Random(seed)
    items = [augmenter.safety(safety_example(world, i), rng) for i in range(3)]
    batch = collate([i.spans for i in items], tokenizer.pad_token_id)
    return batch


def eager_eq3(model, batch, query_mask):
    """Eq. 3 literally: Σ_l Σ_h Σ_i (Σ_{j∈prefill} a_ij − Σ_{j∉prefill, real} a_ij)."""
    model.set_attn_implementation("eager")
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    model.set_attn_implementation("deepalign")
    prefill = batch["prefill_mask"][:, None, None, :].float()
    real = batch["attention_mask"][:, None, None, :].float()
    total = 0
    for probs in out.attentions:
        inside = (probs * prefill).sum(-1)
        outside = (probs * (1 - prefill) * real).sum(-1)
        total = total + ((inside - outside).sum(1) * query_mask.float()).sum()
    return total


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_presto_equals_eq3_from_eager_attention_with_the_same_gradient(world, tokenizer, backend):
    model = tiny_random_model(vocab_size=len(tokenizer), attn_implementation="deepalign", seed=1)
    batch = da_batch(world, tokenizer)
    query_mask = presto_query_mask(batch["prefill_mask"], batch["attention_mask"])
    assert query_mask.any()
    with collect_prefill_mass(batch["prefill_mask"], backend=backend) as collected:
        model(batch["input_ids"], attention_mask=batch["attention_mask"])
    penalty = presto_penalty(collected.stacked(), query_mask, layer_mean=False)
    weight = model.model.layers[0].self_attn.k_proj.weight
    got_grad = torch.autograd.grad(penalty, weight)[0]
    want = eager_eq3(model, batch, query_mask)
    want_grad = torch.autograd.grad(want, weight)[0]
    assert torch.allclose(penalty, want, atol=1e-4, rtol=1e-5)
    assert torch.allclose(got_grad, want_grad, atol=1e-5, rtol=1e-4) and want_grad.abs().max() > 0
    assert torch.allclose(presto_penalty(collected.stacked(), query_mask), penalty / 2)  # the default: mean


def test_a_few_presto_steps_lower_the_prefill_mass(world, tokenizer):
    model = tiny_random_model(vocab_size=len(tokenizer), attn_implementation="deepalign", seed=2).train()
    batch = da_batch(world, tokenizer, seed=5)
    query_mask = presto_query_mask(batch["prefill_mask"], batch["attention_mask"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    masses = []
    for _ in range(6):
        with collect_prefill_mass(batch["prefill_mask"]) as collected:
            model(batch["input_ids"], attention_mask=batch["attention_mask"])
        stacked = collected.stacked()
        masses.append(float((stacked.detach().sum(2) * query_mask).sum() / query_mask.sum()))
        optimizer.zero_grad()
        presto_penalty(stacked, query_mask, layer_mean=False).backward()
        optimizer.step()
    assert masses[-1] < 0.8 * masses[0]


def test_constrained_betas_and_formula():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    positions = response_positions(mask)
    assert positions.tolist() == [[0, 0, 1, 2, 3, 4, 5, 6, 0]]
    assert constrained_betas(positions)[mask].tolist() == pytest.approx([0.5, 2, 2, 2, 2, 0.1])
    gen = torch.Generator().manual_seed(0)
    policy, reference = torch.randn(1, 9, generator=gen), torch.randn(1, 9, generator=gen)
    loss, count = constrained_token_loss(policy, reference, mask)
    betas = constrained_betas(positions)
    manual = sum(-(2 / betas[0, t]) * torch.log(torch.sigmoid(betas[0, t] * (policy[0, t] - reference[0, t])))
                 for t in range(9) if mask[0, t])
    assert count == 6 and torch.allclose(loss, manual)


def test_constrained_gradient_at_initialisation_is_the_sft_gradient(world, tokenizer):
    model = tiny_random_model(vocab_size=len(tokenizer), seed=4)
    reference = copy.deepcopy(model)
    augmenter = SafetyRecoveryAugmenter(tokenizer, augment_probability=0.0)
    items = [augmenter.utility(UtilityExample(world.request(i), world.compliant_response(i)))
             for i in world.benign_items()[:3]]
    batch = collate([i.spans for i in items], tokenizer.pad_token_id)
    mask = batch["response_mask"] | batch["end_mask"]
    ids, attention = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref_logprobs = target_logprobs(reference(ids, attention_mask=attention).logits, ids)
    policy_logprobs = target_logprobs(model(ids, attention_mask=attention).logits, ids)
    constrained, _ = constrained_token_loss(policy_logprobs, ref_logprobs, mask)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(constrained, params, retain_graph=True)
    sft, _ = token_nll(model(ids, attention_mask=attention).logits, ids, mask)
    want = torch.autograd.grad(sft, params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)


def test_presto_gradient_survives_activation_checkpointing(world, tokenizer):
    """Checkpointed layers are recomputed in backward, outside collect_prefill_mass: the mask must
    travel as a forward keyword (as DARecipe passes it), or the penalty's gradient vanishes."""
    from deepalign.training.recipes import DARecipe, make_batch

    recipe = DARecipe(tokenizer, [safety_example(world, i) for i in range(3)],
                      [UtilityExample("how do i make tea ?", world.compliant_response("tea"))],
                      augment_probability=1.0, presto_weight=1.0)
    batch = make_batch(recipe.sample(random.Random(0), 4), tokenizer.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        model = tiny_random_model(vocab_size=len(tokenizer), attn_implementation="deepalign", seed=6).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        terms = recipe.loss_terms(model, batch)
        grads.append(torch.autograd.grad(terms["loss"], model.model.layers[1].self_attn.q_proj.weight)[0])
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
