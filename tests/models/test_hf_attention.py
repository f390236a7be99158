"""``attn_implementation="deepalign"`` on tiny random Hugging Face models: logits match eager
attention, and the collected per-layer mass equals the mass computed from eager probabilities."""

from __future__ import annotations

import pytest
import torch

from deepalign.models.cache import cache_kwargs, output_cache

from deepalign.models.attention import collect_prefill_mass
from deepalign.models.loading import tiny_random_model

LAYERS = 2
FAMILY_OPTIONS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": dict(sliding_window=6),
    "gemma2": dict(sliding_window=5, attn_logit_softcapping=7.0, final_logit_softcapping=None),
    "gemma3": dict(sliding_window=5),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    model = tiny_random_model(family, vocab_size=97, layers=LAYERS, max_positions=64, seed=seed,
                              attn_implementation="deepalign", **FAMILY_OPTIONS[family])
    assert model.config._attn_implementation == "deepalign"
    return model


def batch(seed: int = 1, length: int = 14):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 97, (2, length), generator=gen)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[0, :4] = 0  # left padding
    prefill_mask = torch.zeros(2, length, dtype=torch.bool)
    prefill_mask[:, 7:11] = True
    return input_ids, attention_mask, prefill_mask


def eager_reference(model, input_ids, attention_mask, prefill_mask):
    model.set_attn_implementation("eager")
    out = model(input_ids, attention_mask=attention_mask, output_attentions=True)
    masses = [(probs * prefill_mask[:, None, None, :]).sum(-1) for probs in out.attentions]
    model.set_attn_implementation("deepalign")
    return out.logits, masses


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    return request.param


@pytest.mark.parametrize("family", sorted(FAMILY_OPTIONS))
def test_logits_and_mass_match_eager(family, backend):
    model = tiny_model(family)
    input_ids, attention_mask, prefill_mask = batch()
    want_logits, want_masses = eager_reference(model, input_ids, attention_mask, prefill_mask)
    with collect_prefill_mass(prefill_mask, backend=backend) as collected:
        logits = model(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (logits - want_logits)[real].abs().max() < 2e-5
    assert collected.layers == list(range(LAYERS))
    assert collected.stacked().shape == (2, 2, 4, 14)
    for got, want in zip(collected.masses, want_masses):
        rows = real[:, None, :].expand_as(want)
        assert (got - want)[rows].abs().max() < 1e-5
        assert got[rows].min() >= 0 and got[rows].max() <= 1 + 1e-6


def test_outside_the_context_it_is_plain_attention():
    model = tiny_model("llama")
    input_ids, attention_mask, prefill_mask = batch()
    want, _ = eager_reference(model, input_ids, attention_mask, prefill_mask)
    got = model(input_ids, attention_mask=attention_mask).logits
    assert (got - want)[attention_mask.bool()].abs().max() < 2e-5


def test_collected_mass_carries_the_graph(backend):
    """∂(Σ mass)/∂θ through the kernel equals autograd through eager attention probabilities."""
    model = tiny_model("qwen2")
    input_ids, _, prefill_mask = batch()
    weight = model.model.layers[1].self_attn.q_proj.weight
    _, want_masses = eager_reference(model, input_ids, None, prefill_mask)
    want = torch.autograd.grad(sum(m.sum() for m in want_masses), weight)[0]
    with collect_prefill_mass(prefill_mask, backend=backend) as collected:
        model(input_ids)
    got = torch.autograd.grad(collected.stacked().sum(), weight)[0]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert want.abs().max() > 0


def test_incremental_decoding_with_a_kv_cache_matches_eager():
    model = tiny_model("mistral")
    input_ids, _, _ = batch(length=10)
    full, _ = eager_reference(model, input_ids, None, torch.zeros(2, 10, dtype=torch.bool))
    prefix = model(input_ids[:, :7], use_cache=True)
    step = model(input_ids[:, 7:], **cache_kwargs(model, output_cache(prefix)), use_cache=True)
    assert (step.logits - full[:, 7:]).abs().max() < 2e-5


def test_refuses_what_it_cannot_honour():
    model = tiny_model("llama")
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    input_ids, _, _ = batch()
    with pytest.raises(ValueError, match="no attention dropout"):
        model(input_ids)
    model.eval()
    with pytest.raises(ValueError, match="2-D key padding mask"):
        model(input_ids, attention_mask=torch.zeros(2, 1, 14, 14))
    with pytest.raises(TypeError, match=r"prefill_mask must be a bool tensor of shape \[B, T\]"):
        with collect_prefill_mass(torch.zeros(2, 14)):
            pass
    with pytest.raises(ValueError, match="prefill_mask has batch size 3"):
        with collect_prefill_mass(torch.zeros(3, 14, dtype=torch.bool)):
            model(input_ids)
