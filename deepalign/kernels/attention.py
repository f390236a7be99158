"""Attention that also returns, and differentiates, the attention mass on prefill keys.

For queries ``q [B, Hq, Tq, D]``, keys and values ``k, v [B, Hkv, Tk, D]`` (``Hq % Hkv == 0``,
query head ``h`` reads key/value head ``h // (Hq / Hkv)``) and a boolean ``prefill_mask [B, Tk]``::

    s_ij = scale · q_i · k_j                       (scale defaults to 1 / sqrt(D))
    s_ij = softcap · tanh(s_ij / softcap)          (only with softcap, as Gemma 2)
    visible(i, j) = key_padding_mask[b, j]                         (True = real token)
                    and j ≤ i + (Tk − Tq)                          (causal, bottom-right aligned)
                    and j > i + (Tk − Tq) − window                 (sliding window, as Hugging Face)
    P_ij = softmax_j(s_ij over visible j)
    out_i = Σ_j P_ij v_j                    [B, Hq, Tq, D], dtype of q
    mass_i = Σ_j P_ij · prefill_mask[b, j]  [B, Hq, Tq], float32

A query with no visible key gets ``out = 0`` and ``mass = 0`` (never NaN), and zero gradients.
Both outputs are differentiable with respect to ``q``, ``k`` and ``v``: with ``g = ∂L/∂mass``,
``∂L/∂P_ij = dO_i · v_j + g_i · m_j``, so the softmax backward uses
``Δ_i = rowsum(dO ∘ O)_i + g_i · mass_i`` and ``dS = P ∘ (dP − Δ)`` (FlashAttention-2 with one extra
term). No ``[Tq, Tk]`` matrix is ever stored: the Triton kernels keep a second online-softmax
running sum ``l_S = l_S · α + rowsum(p · m)`` beside the denominator ``l``, so ``mass = l_S / l``;
the PyTorch reference works on query chunks and recomputes them in backward (checkpointing).

PRESTO's penalty (Vega & Singh, Eq. 3) is ``Σ_layers Σ_heads Σ_i (2 · mass_i − 1)`` over the query
positions from the first prefill token on.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from deepalign.kernels._dispatch import Backend, check_float_tensor, check_same_device, resolve_backend

# The Triton kernels serve head dims 1..256 (below 16 in a masked 16-wide block, the smallest
# tl.dot); larger head dims, and GPUs older than sm_80, run the PyTorch reference (on the same
# device) after a one-time warning that names the reason.
MAX_KERNEL_HEAD_DIM = 256
PRECISIONS = ("tf32", "ieee")
_WARNED: set[str] = set()


class AttentionMask(NamedTuple):
    """The visibility rule shared by both implementations (see the module docstring)."""

    causal: bool
    window: int | None
    softcap: float | None
    scale: float


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefill_mask: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    precision: str | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the attention mass on prefill keys; see the module docstring.

    Args:
        q: ``[B, Hq, Tq, D]`` float16 / bfloat16 / float32. The Triton kernel serves ``D ≤ 256``;
            a larger head dim (or a GPU older than sm_80) runs the PyTorch reference, with a
            one-time warning naming the reason.
        k, v: ``[B, Hkv, Tk, D]``, same dtype, ``Hq % Hkv == 0``.
        prefill_mask: bool ``[B, Tk]``, True on prefill keys.
        causal: bottom-right aligned causal masking (query ``i`` sees key ``j ≤ i + Tk − Tq``).
        softmax_scale: defaults to ``1 / sqrt(D)``.
        key_padding_mask: bool ``[B, Tk]``, True on real tokens (left padding is False).
        window: sliding window (needs ``causal``): query ``i`` sees keys ``j > i + Tk − Tq − window``.
        softcap: tanh logit capping, ``s ← softcap · tanh(s / softcap)``.
        precision: dot products of float32 inputs in the Triton kernel on a GPU: ``"tf32"``
            (tensor cores, the default) or ``"ieee"`` (exact float32 products, much slower).
            Ignored for half precisions, in the interpreter (always IEEE) and by the reference.
        backend: ``"auto"`` (CUDA → Triton; CPU → PyTorch, or Triton's interpreter with
            ``TRITON_INTERPRET=1``), ``"triton"`` or ``"torch"``.

    Returns:
        ``(out [B, Hq, Tq, D]`` in q's dtype, ``mass [B, Hq, Tq]`` float32``)``.
    """
    spec = _validate(q, k, v, prefill_mask, causal, softmax_scale, key_padding_mask, window, softcap)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    device = check_same_device(q=q, k=k, v=v, prefill_mask=prefill_mask, key_padding_mask=key_padding_mask)
    if resolve_backend(backend, device) == "triton":
        reason = kernel_unsupported_reason(q.shape[-1], device)
        if reason is None:
            from deepalign.kernels.attention_triton import PrefillAttentionFunction

            return PrefillAttentionFunction.apply(q, k, v, prefill_mask, key_padding_mask, spec, precision)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
        _warn_once(reason)
    return prefill_attention_reference(q, k, v, prefill_mask, key_padding_mask, spec)


def kernel_unsupported_reason(head_dim: int, device: torch.device) -> str | None:
    """Why the Triton kernel cannot serve a call (``None`` when it can)."""
    if head_dim > MAX_KERNEL_HEAD_DIM:
        return (f"head dim {head_dim} exceeds the Triton kernel's maximum of {MAX_KERNEL_HEAD_DIM} "
                f"(its tiles would not fit shared memory)")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the GPU is sm_{major}{minor}; the Triton kernel needs sm_80 or newer (bf16/TF32 tensor cores)"
    return None


def _warn_once(reason: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(f"prefill_attention: {reason}; using the PyTorch reference path (same results, slower, "
                  f"memory bounded by query chunks)", RuntimeWarning, stacklevel=3)


def _validate(q, k, v, prefill_mask, causal, softmax_scale, key_padding_mask, window, softcap) -> AttentionMask:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, 4, "[B, H, T, D]")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads_q, _, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {batch}")
    if k.shape[3] != dim:
        raise ValueError(f"k and v have head dim {k.shape[3]} but q has {dim}")
    heads_kv = k.shape[1]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"the number of query heads ({heads_q}) must be a multiple of the number of "
                         f"key/value heads ({heads_kv})")
    if dim < 1:
        raise ValueError(f"head dim D must be at least 1, got {dim}")
    keys = k.shape[2]
    for name, mask in (("prefill_mask", prefill_mask), ("key_padding_mask", key_padding_mask)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"{name} must be a bool tensor, got {got}")
        if mask.shape != (batch, keys):
            raise ValueError(f"{name} must have shape [B, Tk] = {(batch, keys)}, got {tuple(mask.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        if not causal:
            raise ValueError("window needs causal=True (sliding windows are defined for causal attention)")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(dim)
    elif not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number or None, got {softmax_scale!r}")
    return AttentionMask(causal, window, None if softcap is None else float(softcap), float(softmax_scale))


def visible_keys(spec: AttentionMask, query_pos: torch.Tensor, key_pos: torch.Tensor, num_queries: int,
                 num_keys: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean visibility ``[B or 1, 1, Q, Tk]`` of keys ``key_pos [Tk]`` for queries ``query_pos [Q]``."""
    absolute = query_pos[:, None] + (num_keys - num_queries)
    visible = torch.ones(query_pos.shape[0], key_pos.shape[0], dtype=torch.bool, device=query_pos.device)
    if spec.causal:
        visible &= key_pos[None, :] <= absolute
    if spec.window is not None:
        visible &= key_pos[None, :] > absolute - spec.window
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    return visible


def _reference_chunk(q_chunk, k, v, prefill, key_padding_mask, spec, start, num_queries):
    """Out and mass for queries ``start … start + C`` in ``prefill``'s dtype (float32, or float64
    for float64 inputs). ``q_chunk [B, Hkv, G, C, D]``, ``k, v [B, Hkv, Tk, D]``; returns
    ``[B, Hkv, G, C, D]`` and ``[B, Hkv, G, C]``."""
    batch, heads_kv, group, chunk, dim = q_chunk.shape
    num_keys = k.shape[2]
    compute = prefill.dtype
    flat_q = q_chunk.to(compute).reshape(batch, heads_kv, group * chunk, dim)
    scores = (flat_q @ k.to(compute).transpose(-1, -2)).reshape(batch, heads_kv, group, chunk, num_keys) * spec.scale
    if spec.softcap is not None:
        scores = spec.softcap * torch.tanh(scores / spec.softcap)
    query_pos = torch.arange(start, start + chunk, device=q_chunk.device)
    key_pos = torch.arange(num_keys, device=q_chunk.device)
    visible = visible_keys(spec, query_pos, key_pos, num_queries, num_keys, key_padding_mask)[:, :, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row with no visible key is NaN after softmax; `where` replaces it by zeros, and its NaN
    # gradient ends at masked_fill, which gives masked scores a zero gradient.
    probs = torch.where(visible.any(dim=-1, keepdim=True), torch.softmax(scores, dim=-1), 0.0)
    out = (probs.reshape(batch, heads_kv, group * chunk, num_keys) @ v.to(compute)).reshape(q_chunk.shape)
    mass = (probs * prefill[:, None, None, None, :]).sum(dim=-1)
    return out, mass


def prefill_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefill_mask: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    spec: AttentionMask,
    *,
    chunk_size: int | None = None,
    max_chunk_scores: int = 1 << 22,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch implementation (the CPU path), float32 inside (float64 for float64 inputs, which
    the public function does not accept but tests and self-checks use as an oracle), ``chunk_size``
    queries at a time.

    By default the chunk holds as many queries as keep one chunk's scores (``B · Hq · C · Tk``
    floats) within ``max_chunk_scores`` (16 MiB), at least 16. When there is more than one chunk
    and autograd is recording, each chunk is checkpointed, so backward recomputes it instead of
    keeping its probabilities: peak memory stays at one chunk's scores, never ``[Tq, Tk]`` per head.
    """
    batch, heads_q, num_queries, dim = q.shape
    heads_kv = k.shape[1]
    if chunk_size is None:
        chunk_size = max(16, max_chunk_scores // max(1, batch * heads_q * k.shape[2]))
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    recompute = needs_grad and num_queries > chunk_size
    grouped = q.reshape(batch, heads_kv, heads_q // heads_kv, num_queries, dim)
    prefill = prefill_mask.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    outs, masses = [], []
    for start in range(0, num_queries, chunk_size):
        q_chunk = grouped[:, :, :, start:start + chunk_size]
        args = (q_chunk, k, v, prefill, key_padding_mask, spec, start, num_queries)
        if recompute:
            out, mass = checkpoint(_reference_chunk, *args, use_reentrant=False)
        else:
            out, mass = _reference_chunk(*args)
        outs.append(out)
        masses.append(mass)
    if not outs:
        return q.new_zeros(q.shape), q.new_zeros((batch, heads_q, 0), dtype=torch.float32)
    out = torch.cat(outs, dim=3).reshape(batch, heads_q, num_queries, dim).to(q.dtype)
    mass = torch.cat(masses, dim=3).reshape(batch, heads_q, num_queries).to(torch.float32 if q.dtype != torch.float64
                                                                           else torch.float64)
    return out, mass
