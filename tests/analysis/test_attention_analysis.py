"""Per-head attention to prefills: TransformerLens hooks = eager attention = the fused kernel."""

from __future__ import annotations

import pytest
import torch

from deepalign.analysis.attention import (
    PrefillExample,
    compare_models,
    load_bridge,
    prefill_mass_by_head,
    prefill_mass_by_head_fused,
    query_mask,
)
from deepalign.models.chat import render_chat
from tests.helpers import save_tiny_model
from deepalign.models.loading import load_pretrained


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("model"), tokenizer, seed=5, layers=2)


def examples(world, count=3):
    out = []
    for index, item in enumerate(world.harmful_items()[:count]):
        words = world.compliant_response(item).split()
        out.append(PrefillExample(world.request(item, index), " ".join(words[: 3 + index]),
                                  " ".join(words[3 + index: 6 + index])))
    return out


def eager_mass(model, tokenizer, cases, queries):
    total, count = 0, 0
    for case in cases:
        spans = render_chat(tokenizer, case.prompt, prefill=case.prefill, response=case.continuation, close_turn=False)
        rows = query_mask(spans, queries)
        out = model(torch.tensor([spans.input_ids]), output_attentions=True)
        prefill = spans.mask("prefill").double()
        total = total + torch.stack([(a[0].double() * prefill).sum(-1)[:, rows].sum(-1) for a in out.attentions])
        count += int(rows.sum())
    return (total / count).float()


@pytest.mark.parametrize("queries", ["response", "presto"])
def test_hooks_eager_and_kernel_agree(world, tokenizer, saved_model, queries, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the fused path's CPU reference (the interpreter is slow)
    cases = examples(world)
    bridge = load_bridge(saved_model)
    hooked = prefill_mass_by_head(bridge, cases, queries=queries, progress=False)
    eager_model, _ = load_pretrained(saved_model, attn_implementation="eager")
    eager = eager_mass(eager_model, tokenizer, cases, queries)
    fused_model, _ = load_pretrained(saved_model, attn_implementation="deepalign")
    fused = prefill_mass_by_head_fused(fused_model, tokenizer, cases, queries=queries, progress=False)
    assert hooked.shape == (2, 4)
    assert torch.allclose(hooked, eager, atol=1e-6) and torch.allclose(fused, eager, atol=1e-5)
    assert (hooked > 0).all() and (hooked < 1).all()


def test_compare_and_errors(world, tokenizer):
    # second − first, written out: [[.5 − .25, .125 − .75], [.3 − .3, 1 − .5]] (dyadic values, and .3 − .3 is exactly 0).
    first = torch.tensor([[0.25, 0.75], [0.30, 0.50]])
    second = torch.tensor([[0.50, 0.125], [0.30, 1.00]])
    compared = compare_models(first, second)
    assert torch.equal(compared["first"], first) and torch.equal(compared["second"], second)
    assert compared["difference"].tolist() == [[0.25, -0.625], [0.0, 0.5]]
    assert set(compared) == {"first", "second", "difference"}
    with pytest.raises(ValueError, match="different layer × head shapes"):
        compare_models(first, torch.rand(3, 2))
    spans = render_chat(tokenizer, "hi", response="sure")
    with pytest.raises(ValueError, match="empty prefill"):
        query_mask(spans)
    with pytest.raises(ValueError, match="queries must be"):
        query_mask(render_chat(tokenizer, "hi", prefill="sure"), "all")


def test_attention_received_per_token(world, saved_model):
    from deepalign.analysis.attention import attention_received

    bridge = load_bridge(saved_model)
    example = examples(world, 1)[0]
    received, tokens = attention_received(bridge, example)
    assert received.shape == (2, len(tokens))
    # Each query's attention sums to one: Σ_j received[l, j] · (T − j) = T (number of queries).
    length = len(tokens)
    weights = torch.arange(length, 0, -1, dtype=torch.float32)
    assert torch.allclose((received * weights).sum(-1), torch.full((2,), float(length)), atol=1e-4)
    assert received[:, 0].min() > 0


def test_smollm2_through_the_bridge():
    """The real chat model (a GGUF file) booted into TransformerLens: 30 layers × 9 heads."""
    from deepalign.models.loading import smollm2_path

    bridge = load_bridge(smollm2_path())
    mass = prefill_mass_by_head(bridge, [PrefillExample("How do I pick a lock?", "Sure, here is how",
                                                        " to pick a lock")], progress=False)
    assert mass.shape == (30, 9) and (mass >= 0).all() and (mass <= 1).all() and mass.mean() > 0
