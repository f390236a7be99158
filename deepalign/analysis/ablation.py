"""Head ablation: zero- or mean-ablate chosen attention heads of a Hugging Face model.

A head's output is its slice of the input of the attention output projection (``o_proj``); the
ablation replaces that slice by zeros or by the head's mean output over a reference set of
inputs, through a forward pre-hook, so it works with ``generate`` and with RAP. Used to test
causally whether the heads that attend most to harmful prefills carry the attack: ablate the ``k``
top heads and compare prefilling and RAP scores with and without them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


def _attention_modules(model) -> list:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "o_proj") for layer in layers):
        raise ValueError("head ablation needs a decoder whose layers have self_attn.o_proj (Llama, Qwen, Mistral, Gemma)")
    return [layer.self_attn for layer in layers]


def _check_heads(model, heads: Sequence[tuple[int, int]]) -> tuple[int, int]:
    layers = len(_attention_modules(model))
    n_heads = model.config.num_attention_heads
    for layer, head in heads:
        if not (0 <= layer < layers and 0 <= head < n_heads):
            raise ValueError(f"head ({layer}, {head}) does not exist: the model has {layers} layers × {n_heads} heads")
    return layers, n_heads


def top_heads(mass: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs with the largest values of a ``[layers, heads]`` map."""
    if not 1 <= k <= mass.numel():
        raise ValueError(f"k must be in [1, {mass.numel()}], got {k}")
    flat = mass.flatten().topk(k).indices.tolist()
    return [(i // mass.shape[1], i % mass.shape[1]) for i in flat]


def random_heads(shape: tuple[int, int], k: int, *, exclude: Sequence[tuple[int, int]] = (),
                 seed: int = 0) -> list[tuple[int, int]]:
    """``k`` (layer, head) pairs of a ``shape = (layers, heads)`` model drawn at random (a seeded
    permutation of all heads, in its order) from the heads not in ``exclude``: the control of a
    top-head ablation, which must not remove any of the heads it is compared with."""
    layers, heads = shape
    excluded = {(int(l), int(h)) for l, h in exclude}
    available = layers * heads - len(excluded & {(l, h) for l in range(layers) for h in range(heads)})
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] (heads outside the {len(excluded)} excluded), got {k}")
    generator = torch.Generator().manual_seed(seed)
    order = ((int(i) // heads, int(i) % heads) for i in torch.randperm(layers * heads, generator=generator))
    return [cell for cell in order if cell not in excluded][:k]


@torch.no_grad()
def head_means(model, batches: Sequence[dict]) -> dict[int, torch.Tensor]:
    """Per layer, the mean ``o_proj`` input ``[H · D]`` over all real tokens of ``batches`` (dicts
    with ``input_ids`` and ``attention_mask``): the values mean ablation substitutes."""
    modules = _attention_modules(model)
    sums = {i: 0 for i in range(len(modules))}
    count = 0
    masks: list[torch.Tensor] = []

    def make_hook(index):
        def hook(module, args):
            sums[index] = sums[index] + (args[0] * masks[-1][..., None]).sum(dim=(0, 1))
        return hook

    handles = [m.o_proj.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        device = next(model.parameters()).device
        for batch in batches:
            mask = batch["attention_mask"].to(device).float()
            masks.append(mask)
            model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {i: s / max(count, 1) for i, s in sums.items()}


@contextlib.contextmanager
def ablate_heads(model, heads: Sequence[tuple[int, int]], *, mode: str = "zero",
                 means: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """Within the block, the given (layer, head) outputs are zero (``mode="zero"``) or their mean
    (``mode="mean"``, from :func:`head_means`)."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    if mode == "mean" and means is None:
        raise ValueError("mean ablation needs the heads' means (head_means)")
    _, n_heads = _check_heads(model, heads)
    modules = _attention_modules(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def make_hook(layer, chosen):
        def hook(module, args):
            hidden = args[0].clone()
            width = hidden.shape[-1] // n_heads
            for head in chosen:
                part = slice(head * width, (head + 1) * width)
                hidden[..., part] = 0.0 if mode == "zero" else means[layer][part].to(hidden.dtype)
            return (hidden, *args[1:])
        return hook

    handles = [modules[layer].o_proj.register_forward_pre_hook(make_hook(layer, chosen))
               for layer, chosen in by_layer.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
