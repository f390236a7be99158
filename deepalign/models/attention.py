"""The fused prefill-attention kernel as a Hugging Face attention implementation.

    from deepalign.models.attention import register_attention, collect_prefill_mass

    register_attention()                     # once; then any supported model can use it
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="deepalign")
    with collect_prefill_mass(prefill_mask) as collected:   # prefill_mask: bool [B, T]
        logits = model(input_ids, attention_mask=attention_mask).logits
    collected.masses        # one [B, Hq, Tq] float32 tensor per attention layer, in layer order,
                            # attached to the autograd graph (PRESTO trains on them)

With activation checkpointing, also pass the mask as the forward keyword ``deepalign_prefill_mask``
(``model(ids, deepalign_prefill_mask=prefill_mask)``; the training recipes do): recomputation runs
outside the ``with`` block, and only forward keywords are replayed.

Outside :func:`collect_prefill_mass` the attention is ordinary attention (the prefill mask is
empty and the mass is dropped), so a model loaded with ``attn_implementation="deepalign"`` can be
used for everything else too. The implementation honours the keyword arguments that Llama, Qwen2,
Qwen3, Mistral and Gemma 2/3 attention layers pass (``scaling``, ``sliding_window``, ``softcap``,
``is_causal``) and a 2-D key padding mask; attention dropout, custom 4-D masks and non-causal
sliding windows are refused with a clear error rather than silently ignored.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch

from deepalign.kernels import prefill_attention
from deepalign.kernels._dispatch import Backend

ATTENTION_NAME = "deepalign"
# Model-forward keyword that carries the prefill mask to every attention layer. Hugging Face passes
# forward kwargs down to the attention function and replays them when activation checkpointing
# recomputes a layer during backward, which a context variable alone would not survive.
PREFILL_KWARG = "deepalign_prefill_mask"


@dataclass
class PrefillMassCollector:
    """State of one :func:`collect_prefill_mass` block.

    ``prefill_mask``: bool ``[B, T]`` over the positions of the forward pass (with a KV cache: over
    every position of the sequence so far; keys past its end count as not prefill).
    ``masses``: per attention call, the ``[B, Hq, Tq]`` mass on prefill keys; ``layers``: the
    ``layer_idx`` of the module that produced each entry.
    """

    prefill_mask: torch.Tensor
    backend: Backend = "auto"
    masses: list[torch.Tensor] = field(default_factory=list)
    layers: list[int | None] = field(default_factory=list)

    def keys_mask(self, batch: int, num_keys: int, device: torch.device) -> torch.Tensor:
        """The prefill mask over the ``num_keys`` keys of one attention call, ``[B, Tk]``."""
        return keys_mask(self.prefill_mask, batch, num_keys, device)

    def stacked(self) -> torch.Tensor:
        """All collected masses as one ``[L, B, Hq, Tq]`` tensor (layers in call order)."""
        if not self.masses:
            raise RuntimeError("no attention layer ran inside collect_prefill_mass(); was the model loaded "
                               f"with attn_implementation={ATTENTION_NAME!r}?")
        return torch.stack(self.masses)


def keys_mask(prefill_mask: torch.Tensor, batch: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """``prefill_mask [B, T]`` over the ``num_keys`` keys of one attention call: padded with False
    past its end (generated tokens), or cut to its last ``num_keys`` (a sliding-window cache)."""
    mask = prefill_mask.to(device=device, dtype=torch.bool)
    if mask.shape[0] != batch:
        raise ValueError(f"prefill_mask has batch size {mask.shape[0]} but the model was called with {batch}")
    if mask.shape[1] < num_keys:
        mask = torch.nn.functional.pad(mask, (0, num_keys - mask.shape[1]), value=False)
    return mask[:, -num_keys:]


_ACTIVE: contextvars.ContextVar[PrefillMassCollector | None] = contextvars.ContextVar("deepalign_prefill", default=None)


@contextlib.contextmanager
def collect_prefill_mass(prefill_mask: torch.Tensor, *, backend: Backend = "auto") -> Iterator[PrefillMassCollector]:
    """Within the block, every ``deepalign`` attention layer uses ``prefill_mask`` (bool ``[B, T]``)
    and appends its mass to the yielded collector. ``backend`` forces the kernel path."""
    if not isinstance(prefill_mask, torch.Tensor) or prefill_mask.dtype != torch.bool or prefill_mask.dim() != 2:
        raise TypeError("prefill_mask must be a bool tensor of shape [B, T]")
    collector = PrefillMassCollector(prefill_mask, backend)
    token = _ACTIVE.set(collector)
    try:
        yield collector
    finally:
        _ACTIVE.reset(token)


def deepalign_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Hugging Face attention-interface function. ``query [B, Hq, Tq, D]``, ``key/value
    [B, Hkv, Tk, D]``; ``attention_mask`` is the 2-D key padding mask from
    :func:`deepalign_mask` (or ``None``). Returns ``([B, Tq, Hq, D], None)``."""
    if dropout:
        raise ValueError(f"deepalign attention has no attention dropout (got dropout={dropout}); set the "
                         "model config's attention_dropout to 0 or call model.eval()")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("deepalign attention takes a 2-D key padding mask; got a "
                         f"{attention_mask.dim()}-D attention mask (custom 4-D masks are not supported)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, num_keys = key.shape[0], key.shape[2]
    collector = _ACTIVE.get()
    given = kwargs.get(PREFILL_KWARG)
    backend: Backend = collector.backend if collector is not None else "auto"
    if given is not None:
        prefill_mask = keys_mask(given, batch, num_keys, key.device)
    elif collector is not None:
        prefill_mask = collector.keys_mask(batch, num_keys, key.device)
    else:
        prefill_mask = torch.zeros(batch, num_keys, dtype=torch.bool, device=key.device)
    padding = None if attention_mask is None else attention_mask[:, -num_keys:].to(torch.bool)
    out, mass = prefill_attention(query, key, value, prefill_mask, causal=bool(causal), softmax_scale=scaling,
                                  key_padding_mask=padding, window=sliding_window, softcap=softcap, backend=backend)
    if collector is not None:
        collector.masses.append(mass)
        collector.layers.append(getattr(module, "layer_idx", None))
    return out.transpose(1, 2).contiguous(), None


def deepalign_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask-interface function: the 2-D boolean key padding mask (True = real token), cut to the
    last ``kv_length`` keys, or ``None`` when nothing is padded. Causality, sliding windows and
    softcaps are applied inside the kernel from the attention layer's own arguments."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register_attention() -> str:
    """Register ``"deepalign"`` with transformers' attention and mask interfaces (idempotent).
    Returns the name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, deepalign_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, deepalign_mask)
    return ATTENTION_NAME
