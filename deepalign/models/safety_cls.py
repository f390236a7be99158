"""The explicit safety signal of Li & Kim (ICML 2025): a [CLS] token before BOS and a binary head.

A model gets a new special token ``<|cls|>`` (its embedding starts as the mean of the others) and
a head ``safety_head: Linear(hidden, 1)`` on the final, normed hidden state of that token:

    z = w · h_CLS + b,     p(malicious) = σ(z),     L_cls = BCE(z, label)   (label 1 = malicious)

The head is a submodule of the Hugging Face model, so ``save_pretrained`` writes it into the same
safetensors file; :func:`load_safety_cls` reattaches it. The token id lives in the config
(``deepalign_safety_cls_token_id``).

Layout of a row (left padded)::

    [pad … pad] [CLS] <bos> … prompt … | prefill, response, end of turn
    position ids:  0     1    2 …                      (pads 0)

Who sees whom (``visible[b, i, j]``: query i may attend to key j; pads are never keys):

* ``pretrain``: [CLS] sees every token of its row (itself included); no token sees [CLS]; the
  other tokens are causal, as in plain language modelling.
* ``sft``: [CLS] sees itself and the user's own words only (the prompt without pad, BOS and
  template tokens, as inference rule 4 reads it); prompt tokens do not see [CLS]; response tokens
  (prefill, response, end of turn) see [CLS] and are causal otherwise.

The visibility becomes an additive 4-D mask ``[B, 1, T, T]`` (0 or the dtype's minimum), which the
SDPA and eager attention paths of Hugging Face models take as is, on CPU and GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deepalign.models.cache import cache_kwargs

CLS_TOKEN = "<|cls|>"
CONFIG_KEY = "deepalign_safety_cls_token_id"
STAGES = ("pretrain", "sft")


def add_safety_cls(model, tokenizer, token: str = CLS_TOKEN, *, seed: int = 0) -> int:
    """Give ``model`` and ``tokenizer`` the [CLS] token and the safety head (in place); returns the
    token id. The new embedding row is the mean of the existing ones; the head starts small."""
    if has_safety_cls(model):
        raise ValueError("the model already has a safety [CLS] head")
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    embeddings = model.get_input_embeddings()
    if token_id >= embeddings.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[token_id] = weight[:token_id].mean(dim=0)
    generator = torch.Generator().manual_seed(seed)
    _attach_head(model)
    with torch.no_grad():
        head = model.safety_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
        head.bias.zero_()
    setattr(model.config, CONFIG_KEY, int(token_id))
    return int(token_id)


def has_safety_cls(model) -> bool:
    return isinstance(getattr(model, "safety_head", None), nn.Linear)


def cls_token_id(model) -> int:
    token_id = getattr(model.config, CONFIG_KEY, None)
    if token_id is None or not has_safety_cls(model):
        raise ValueError("the model has no safety [CLS] token and head; train one with the cls recipes "
                         "(deepalign.training.cls_recipe) or load it with load_safety_cls")
    return int(token_id)


def _attach_head(model) -> None:
    parameter = next(model.parameters())
    model.safety_head = nn.Linear(model.config.hidden_size, 1).to(device=parameter.device, dtype=parameter.dtype)


def load_safety_cls(source: str | Path, **kwargs):
    """``(model, tokenizer)`` of a folder saved from a model with a safety [CLS] head."""
    import transformers
    from safetensors import safe_open

    from deepalign.models.loading import load_pretrained

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the head's weights are "unexpected" to from_pretrained
    try:
        model, tokenizer = load_pretrained(source, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    folder = Path(source)
    if getattr(model.config, CONFIG_KEY, None) is None:
        raise ValueError(f"{folder}: config.json has no {CONFIG_KEY}; this model was not trained with a [CLS] head")
    _attach_head(model)
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith("safety_head."):
                    found[key.removeprefix("safety_head.")] = handle.get_tensor(key)
    if set(found) != {"weight", "bias"}:
        raise ValueError(f"{folder}: the safetensors files hold no complete safety_head (found {sorted(found)})")
    model.safety_head.load_state_dict(found)
    return model.eval(), tokenizer


# ----- layout and masks -------------------------------------------------------------------------------


def insert_cls(batch: dict[str, torch.Tensor], cls_id: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Insert the [CLS] column before each left-padded row of a collated batch (``input_ids``,
    ``attention_mask`` and bool ``[B, T]`` masks such as ``loss_mask``, ``user_mask``): returns
    the same keys at ``[B, T + 1]`` plus ``cls_mask`` (True at [CLS]), ``position_ids`` and
    ``cls_index [B]``. Rows must be left padded (real tokens at the end)."""
    ids, attention = batch["input_ids"], batch["attention_mask"].bool()
    rows, width = ids.shape
    lengths = attention.sum(dim=1)
    expected = torch.arange(width, device=ids.device)[None] >= (width - lengths)[:, None]
    if not torch.equal(attention, expected):
        raise ValueError("insert_cls needs left-padded rows (attention_mask 0…0 1…1)")
    cls_index = width - lengths  # in the widened row, the old pad just before the first token
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.shape == ids.shape:
            fill = pad_id if key == "input_ids" else 0
            out[key] = torch.cat([torch.full((rows, 1), fill, dtype=value.dtype, device=value.device), value], dim=1)
        else:
            out[key] = value
    arange = torch.arange(rows, device=ids.device)
    out["input_ids"][arange, cls_index] = cls_id
    out["attention_mask"][arange, cls_index] = 1
    cls_mask = torch.zeros(rows, width + 1, dtype=torch.bool, device=ids.device)
    cls_mask[arange, cls_index] = True
    out["cls_mask"] = cls_mask
    out["cls_index"] = cls_index
    out["position_ids"] = (out["attention_mask"].long().cumsum(dim=1) - 1).clamp_min(0)
    return out


def stage_visibility(widened: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
    """Bool ``[B, T, T]`` visibility for a batch from :func:`insert_cls` (see the module docstring)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    real = widened["attention_mask"].bool()
    cls = widened["cls_mask"]
    width = real.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
    tokens = real & ~cls
    visible = causal[None] & tokens[:, None, :]  # regular queries: earlier real tokens, never [CLS]
    if stage == "pretrain":
        cls_row = real
    else:
        response = widened["prefill_mask"] | widened["response_mask"] | widened["end_mask"]
        visible = visible | (response[:, :, None] & cls[:, None, :])
        cls_row = widened["user_mask"] | cls
    visible = torch.where(cls[:, :, None], cls_row[:, None, :], visible)
    eye = torch.eye(width, dtype=torch.bool, device=real.device)[None]
    return visible | (eye & ~real[:, :, None])  # a pad query sees itself (no empty row)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, Q, K]`` float mask: 0 where ``visible [B, Q, K]``, the dtype's minimum elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)[:, None]


def cls_forward(model, input_ids: torch.Tensor, visible: torch.Tensor, position_ids: torch.Tensor,
                cls_index: torch.Tensor, *, cache=None, use_cache: bool = False, logits_to_keep: int = 0):
    """One forward pass under ``visible``; returns ``(output, cls_logit [B])`` where ``cls_index``
    is each row's [CLS] column among the *queries* of this pass. ``cache`` is the KV cache to extend
    (passed under the keyword the installed transformers expects, see :mod:`deepalign.models.cache`;
    read the new one with :func:`~deepalign.models.cache.output_cache`). ``logits_to_keep = n``
    computes the logits of the last n queries only (0: all)."""
    window = getattr(model.config, "sliding_window", None)
    if window and visible.shape[-1] > window:
        raise ValueError(f"{visible.shape[-1]} keys exceed the model's sliding window of {window}: the [CLS] masks "
                         "replace the model's own masks and do not apply the window")
    dtype = next(model.parameters()).dtype
    output = model(input_ids, attention_mask=additive_mask(visible, dtype), position_ids=position_ids,
                   use_cache=use_cache, output_hidden_states=True, logits_to_keep=logits_to_keep,
                   **cache_kwargs(model, cache))
    hidden = output.hidden_states[-1]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return output, model.safety_head(hidden[rows, cls_index]).squeeze(-1).float()
