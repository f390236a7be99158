"""Per-head attention to harmful prefills, through TransformerLens 4 or through the fused kernel.

For a set of examples (prompt, harmful prefill, optional continuation), the statistic is the mean,
over the chosen query positions of every example, of the attention mass each (layer, head) places on
the prefill tokens: ``mass[l, h] = mean_i Σ_{j ∈ prefill} A^{l,h}_{ij}``. Query positions default to
those from the last prefill token on (the positions that produce the response after the prefill);
``queries="presto"`` takes PRESTO's positions (from the first prefill token on).

Two paths give the same numbers:

* :func:`prefill_mass_by_head` hooks ``blocks.{l}.attn.hook_pattern`` of a TransformerLens
  ``TransformerBridge`` and reduces inside the hook, so no activation cache is kept;
* :func:`prefill_mass_by_head_fused` runs a Hugging Face model with ``attn_implementation="deepalign"``
  and collects the kernel's mass, so no attention pattern is ever materialised (long contexts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from deepalign.models.attention import collect_prefill_mass
from deepalign.models.chat import ChatSpans, render_chat


@dataclass(frozen=True)
class PrefillExample:
    """A prompt, the harmful prefill forced after it, and an optional continuation (text or ids)."""

    prompt: str
    prefill: str | Sequence[int]
    continuation: str | Sequence[int] = ""


def load_bridge(source: str | Path, *, device: str = "cpu"):
    """A TransformerLens 4 ``TransformerBridge`` over a local model folder or GGUF file (loaded by
    :func:`deepalign.models.loading.load_pretrained`; never the hub)."""
    from transformer_lens.model_bridge import TransformerBridge

    from deepalign.models.loading import load_pretrained, resolve_source

    folder, gguf = resolve_source(source)
    if gguf is None:
        return TransformerBridge.boot_transformers(str(folder), device=device)
    model, tokenizer = load_pretrained(source, attn_implementation="eager")
    return TransformerBridge.boot_transformers(str(folder), device=device, hf_model=model, tokenizer=tokenizer)


def query_mask(spans: ChatSpans, queries: str = "response") -> torch.Tensor:
    """Bool ``[T]``: the query positions of one example (see the module docstring)."""
    if spans.prefill.start == spans.prefill.stop:
        raise ValueError("the example has an empty prefill")
    mask = torch.zeros(len(spans), dtype=torch.bool)
    if queries == "response":
        mask[spans.prefill.stop - 1:] = True
    elif queries == "presto":
        mask[spans.prefill.start:] = True
    else:
        raise ValueError(f"queries must be 'response' or 'presto', got {queries!r}")
    return mask


def _render(tokenizer, example: PrefillExample) -> ChatSpans:
    return render_chat(tokenizer, example.prompt, prefill=example.prefill, response=example.continuation,
                       close_turn=False)


def example_spans(tokenizer, example: PrefillExample) -> ChatSpans:
    """The token spans (prompt, prefill, response = the continuation) of one example, as the
    analyses here render it (e.g. to mark the prefill on :func:`attention_received`'s map)."""
    return _render(tokenizer, example)


@torch.no_grad()
def prefill_mass_by_head(bridge, examples: Sequence[PrefillExample], *, queries: str = "response",
                         progress: bool = True) -> torch.Tensor:
    """Mean prefill mass ``[layers, heads]`` from TransformerLens attention-pattern hooks."""
    tokenizer = bridge.tokenizer
    layers, heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    total = torch.zeros(layers, heads, dtype=torch.float64)
    count = 0
    for example in tqdm(examples, desc="attention to prefill", disable=not progress):
        spans = _render(tokenizer, example)
        prefill = spans.mask("prefill")
        rows = query_mask(spans, queries)

        def reduce(pattern, hook):  # pattern [1, H, T, T]: reduce here, keep nothing else
            layer = int(hook.name.split(".")[1])
            mass = (pattern[0].double() * prefill.to(pattern.device)[None, None, :]).sum(-1)  # [H, T]
            total[layer] += mass[:, rows.to(pattern.device)].sum(-1).cpu()
            return pattern

        ids = torch.tensor([spans.input_ids], device=bridge.cfg.device)
        bridge.run_with_hooks(ids, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), reduce)])
        count += int(rows.sum())
    return (total / max(count, 1)).float()


@torch.no_grad()
def prefill_mass_by_head_fused(model, tokenizer, examples: Sequence[PrefillExample], *, queries: str = "response",
                               progress: bool = True) -> torch.Tensor:
    """The same statistic from the fused kernel's mass (``model`` loaded with
    ``attn_implementation="deepalign"``); never materialises an attention pattern."""
    totals = None
    count = 0
    device = next(model.parameters()).device
    for example in tqdm(examples, desc="attention to prefill (fused)", disable=not progress):
        spans = _render(tokenizer, example)
        rows = query_mask(spans, queries).to(device)
        ids = torch.tensor([spans.input_ids], device=device)
        with collect_prefill_mass(spans.mask("prefill")[None].to(device)) as collected:
            model(ids)
        per_layer = collected.stacked()[:, 0]  # [L, H, T]
        summed = per_layer[:, :, rows].double().sum(-1).cpu()
        totals = summed if totals is None else totals + summed
        count += int(rows.sum())
    if totals is None:
        raise ValueError("no examples")
    return (totals / max(count, 1)).float()


def compare_models(first: torch.Tensor, second: torch.Tensor) -> dict[str, torch.Tensor]:
    """Side by side: both ``[layers, heads]`` maps and ``second − first``."""
    if first.shape != second.shape:
        raise ValueError(f"the two models have different layer × head shapes: {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    return {"first": first, "second": second, "difference": second - first}


@torch.no_grad()
def attention_received(bridge, example: PrefillExample) -> tuple[torch.Tensor, list[str]]:
    """The attention each token receives, per layer, for one example (Vega & Singh, Fig. 10/11):
    ``received[l, j] = mean_h mean_{i ≥ j} A^{l,h}_{ij}``. Returns ``([layers, T], token strings)``."""
    tokenizer = bridge.tokenizer
    spans = _render(tokenizer, example)
    length = len(spans)
    seen_by = torch.arange(length, 0, -1, dtype=torch.float64)  # key j is visible to T − j queries
    received = torch.zeros(bridge.cfg.n_layers, length, dtype=torch.float64)

    def reduce(pattern, hook):
        layer = int(hook.name.split(".")[1])
        received[layer] = pattern[0].double().mean(dim=0).sum(dim=0).cpu() / seen_by
        return pattern

    ids = torch.tensor([spans.input_ids], device=bridge.cfg.device)
    bridge.run_with_hooks(ids, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), reduce)])
    return received.float(), [tokenizer.decode([t]) for t in spans.input_ids]
