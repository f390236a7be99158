"""Head ablation changes exactly the chosen heads' outputs."""

from __future__ import annotations

import pytest
import torch

from deepalign.analysis.ablation import ablate_heads, head_means, top_heads
from deepalign.models.loading import tiny_random_model


def capture_o_proj_inputs(model, ids):
    seen = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda module, args, i=i: seen.__setitem__(i, args[0].detach().clone())) for i, layer in enumerate(model.model.layers)]
    model(ids)
    for handle in handles:
        handle.remove()
    return seen


def test_zero_ablation_changes_exactly_that_head():
    model = tiny_random_model(vocab_size=50, layers=2, heads=4, kv_heads=2, head_dim=32, seed=0)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    clean = capture_o_proj_inputs(model, ids)
    with ablate_heads(model, [(1, 2)]):
        # capture after the ablation hook: register our hook later so it sees the modified input
        ablated_logits = model(ids).logits
        handles, seen = [], {}
        for i, layer in enumerate(model.model.layers):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda module, args, i=i: seen.__setitem__(i, args[0].detach().clone())))
        model(ids)
        for handle in handles:
            handle.remove()
    assert torch.equal(seen[0], clean[0])  # layer 0 untouched (and nothing upstream changed)
    assert (seen[1][..., 64:96] == 0).all()
    assert torch.equal(seen[1][..., :64], clean[1][..., :64]) and torch.equal(seen[1][..., 96:], clean[1][..., 96:])
    assert not torch.allclose(ablated_logits, model(ids).logits)  # the hook is gone after the block


def test_mean_ablation_substitutes_the_head_mean():
    model = tiny_random_model(vocab_size=50, layers=2, heads=4, kv_heads=2, head_dim=32, seed=1)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    means = head_means(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    clean = capture_o_proj_inputs(model, ids)
    assert torch.allclose(means[0], clean[0].mean(dim=(0, 1)), atol=1e-6)
    with ablate_heads(model, [(0, 1)], mode="mean", means=means):
        seen = {}
        handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
            lambda module, args: seen.__setitem__(0, args[0].detach().clone()))
        model(ids)
        handle.remove()
    assert torch.allclose(seen[0][..., 32:64], means[0][32:64].expand(3, 7, 32))


def test_top_heads_and_bad_heads():
    mass = torch.tensor([[0.1, 0.9], [0.5, 0.2]])
    assert top_heads(mass, 2) == [(0, 1), (1, 0)]
    model = tiny_random_model(vocab_size=50, layers=2, heads=4, kv_heads=2, head_dim=32)
    with pytest.raises(ValueError, match=r"head \(2, 0\) does not exist: the model has 2 layers × 4 heads"):
        with ablate_heads(model, [(2, 0)]):
            pass
    with pytest.raises(ValueError, match="mean ablation needs"):
        with ablate_heads(model, [(0, 0)], mode="mean"):
            pass
