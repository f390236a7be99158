"""Training recipes: what a step samples and which loss terms it computes.

A recipe has ``sample(rng, batch_size) -> list[TrainingItem]`` and
``loss_terms(model, batch, tokens=None) -> {"loss": …, <term>: …}``, where ``batch`` is
:func:`deepalign.models.chat.collate` of the items plus their stacked ``loss_mask``. Every term is
a sum over the supervised tokens divided by ``tokens``: by default the micro-batch's own count (a
mean over its supervised tokens), or the trainer's step-wide count per micro-batch
(``loss_normalisation="step"``, see :mod:`deepalign.training.trainer`). Recipes that accept
``tokens`` say so with ``token_normalised = True``.

* ``pretrain``: language modelling on plain texts (every token) mixed with chat rows (loss on the
  response), e.g. the synthetic world's knowledge stream and compliant answers: the base model.
* ``sft``: supervised fine-tuning on chat rows (e.g. refusal-only SFT, the shallow alignment).
* ``da``: safety-recovery data augmentation plus the utility anchor (Qi et al.).
* ``presto``: ``da`` + PRESTO's attention penalty from the fused kernel's mass (Vega & Singh),
  weight 1 by default, on the augmented examples, normalised per supervised token.
* ``constrained``: the token-wise constrained objective on chat rows against a frozen reference
  model whose log-probabilities are computed once, before training, in a no-grad pass (or
  online with ``cache_reference=False``).
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from tqdm.auto import tqdm

from deepalign.models.attention import ATTENTION_NAME, PREFILL_KWARG, collect_prefill_mass
from deepalign.models.chat import ChatSpans, collate, encode_text
from deepalign.training.augmentation import SafetyExample, SafetyRecoveryAugmenter, TrainingItem, UtilityExample
from deepalign.training.losses import (
    constrained_token_loss,
    presto_penalty,
    presto_query_mask,
    target_logprobs,
    token_nll,
)

RECIPES = ("pretrain", "sft", "da", "presto", "constrained")


def make_batch(items: Sequence[TrainingItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate items (left padding) and add their ``loss_mask`` ``[B, T]``, ``source`` and ``label`` ``[B]``."""
    batch = collate([item.spans for item in items], pad_id)
    length = batch["input_ids"].shape[1]
    batch["loss_mask"] = torch.stack([torch.nn.functional.pad(item.loss_mask, (length - len(item.loss_mask), 0))
                                      for item in items])
    batch["source"] = torch.tensor([item.source for item in items])
    batch["label"] = torch.tensor([item.label for item in items])
    return batch


def batch_inputs(model, batch):
    """``(input_ids, attention_mask, loss_mask)`` of a batch, on the model's device."""
    device = next(model.parameters()).device
    return batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["loss_mask"].to(device)


def supervised_tokens(batch) -> int:
    """The batch's supervised target tokens (its ``loss_mask`` past position 0, which no logit predicts)."""
    return int(batch["loss_mask"][:, 1:].sum())


def token_denominator(count: int, tokens: float | None) -> float:
    """What a recipe divides its token sums by: ``tokens`` when the trainer gives it, else the
    micro-batch's own ``count`` (at least 1)."""
    return float(tokens) if tokens is not None else max(count, 1)


def mean_nll_terms(model, batch, tokens: float | None = None) -> dict[str, torch.Tensor]:
    """``Σ NLL / tokens`` over the batch's supervised tokens (default: their mean), as ``{"loss", "nll"}``."""
    ids, attention, loss_mask = batch_inputs(model, batch)
    nll, count = token_nll(model(ids, attention_mask=attention).logits, ids, loss_mask)
    loss = nll / token_denominator(count, tokens)
    return {"loss": loss, "nll": loss.detach()}


def longest_row(items: Sequence[TrainingItem]) -> tuple[int, int]:
    """``(length, index)`` of the longest rendered item."""
    return max((len(item.spans), index) for index, item in enumerate(items))


def plain_text_item(tokenizer, text: str) -> TrainingItem:
    """``<bos> text`` with the loss on every text token (spans: prompt = BOS, response = text)."""
    ids = [tokenizer.bos_token_id] + encode_text(tokenizer, text)
    spans = ChatSpans(tuple(ids), slice(0, 1), slice(1, 1), slice(1, len(ids)), slice(len(ids), len(ids)))
    return TrainingItem(spans, spans.mask("response"), 0)


class PretrainRecipe:
    """Language modelling on ``texts`` with a share ``chat_fraction`` of chat rows per batch."""

    token_normalised = True
    name = "pretrain"

    def __init__(self, tokenizer, texts: Sequence[str], chat: Sequence[UtilityExample] = (), *,
                 chat_fraction: float = 0.5):
        if not texts:
            raise ValueError("pretrain needs at least one text")
        if tokenizer.bos_token_id is None:
            raise ValueError("pretrain needs a tokenizer with a BOS token")
        if not 0.0 <= chat_fraction < 1.0 or (chat_fraction > 0 and not chat):
            raise ValueError(f"chat_fraction must be in [0, 1) and needs chat rows when > 0, got {chat_fraction}")
        self.texts = [plain_text_item(tokenizer, text) for text in texts]
        self.chat = SFTRecipe(tokenizer, chat) if chat else None
        self.chat_fraction = chat_fraction

    def sample(self, rng: random.Random, batch_size: int) -> list[TrainingItem]:
        n_chat = round(batch_size * self.chat_fraction) if self.chat else 0
        return [self.texts[rng.randrange(len(self.texts))] for _ in range(batch_size - n_chat)] + (
            self.chat.sample(rng, n_chat) if n_chat else [])

    def longest(self) -> tuple[int, str]:
        length, index = longest_row(self.texts)
        if self.chat is not None and self.chat.longest()[0] > length:
            return self.chat.longest()
        return length, f"text {index + 1}"

    def loss_terms(self, model, batch, tokens: float | None = None) -> dict[str, torch.Tensor]:
        return mean_nll_terms(model, batch, tokens)


class SFTRecipe:
    """Supervised fine-tuning: loss on the response and end-of-turn tokens of chat rows."""

    token_normalised = True
    name = "sft"

    def __init__(self, tokenizer, rows: Sequence[UtilityExample], *, system: str | None = None):
        if not rows:
            raise ValueError("sft needs at least one chat row")
        self.rows = list(rows)
        self.augmenter = SafetyRecoveryAugmenter(tokenizer, system=system)

    def sample(self, rng: random.Random, batch_size: int) -> list[TrainingItem]:
        return [self.augmenter.utility(self.rows[rng.randrange(len(self.rows))]) for _ in range(batch_size)]

    def longest(self) -> tuple[int, str]:
        """Tokens of the longest example this recipe can produce, and which row it is."""
        length, index = longest_row([self.augmenter.utility(row) for row in self.rows])
        return length, f"chat row {index + 1}"

    def loss_terms(self, model, batch, tokens: float | None = None) -> dict[str, torch.Tensor]:
        return mean_nll_terms(model, batch, tokens)


class DARecipe:
    """Safety-recovery augmentation with the utility anchor; with ``presto_weight > 0``, PRESTO.

    Each batch holds ``round(batch_size · safety_fraction)`` safety examples (drawn with
    replacement, augmented afresh) and utility examples for the rest. Defaults from both authors'
    released code: ``safety_fraction`` 0.2 (4 safety + 16 utility examples per device), the PRESTO
    penalty averaged over layers (``presto_layer_mean=False`` sums it)."""

    token_normalised = True

    def __init__(self, tokenizer, safety: Sequence[SafetyExample], utility: Sequence[UtilityExample], *,
                 safety_fraction: float = 0.2, presto_weight: float = 0.0, augment_probability: float = 0.5,
                 max_prefill: int = 100, system: str | None = None, presto_layer_mean: bool = True):
        if not safety:
            raise ValueError("da/presto need at least one safety row")
        if not utility and safety_fraction < 1.0:
            raise ValueError("da/presto need utility rows unless safety_fraction is 1")
        if not 0.0 < safety_fraction <= 1.0:
            raise ValueError(f"safety_fraction must be in (0, 1], got {safety_fraction}")
        if presto_weight < 0:
            raise ValueError(f"presto_weight must be non-negative, got {presto_weight}")
        self.name = "presto" if presto_weight > 0 else "da"
        self.safety, self.utility = list(safety), list(utility)
        self.safety_fraction = safety_fraction
        self.presto_weight = presto_weight
        self.presto_layer_mean = presto_layer_mean
        self.augmenter = SafetyRecoveryAugmenter(tokenizer, augment_probability=augment_probability,
                                                 max_prefill=max_prefill, system=system)

    def sample(self, rng: random.Random, batch_size: int) -> list[TrainingItem]:
        n_safety = max(1, round(batch_size * self.safety_fraction))
        items = [self.augmenter.safety(self.safety[rng.randrange(len(self.safety))], rng) for _ in range(n_safety)]
        items += [self.augmenter.utility(self.utility[rng.randrange(len(self.utility))])
                  for _ in range(batch_size - n_safety)]
        return items

    def longest(self) -> tuple[int, str]:
        """Tokens of the longest example this recipe can produce (the longest prefill), and its row."""
        longest_prefill = self.augmenter.max_prefill
        safety = longest_row([self.augmenter.safety(row, None, prefill=longest_prefill) for row in self.safety])
        utility = longest_row([self.augmenter.utility(row) for row in self.utility]) if self.utility else (0, 0)
        if safety[0] >= utility[0]:
            return safety[0], f"safety row {safety[1] + 1} (with its longest prefill)"
        return utility[0], f"chat row {utility[1] + 1}"

    def loss_terms(self, model, batch, tokens: float | None = None) -> dict[str, torch.Tensor]:
        ids, attention, loss_mask = batch_inputs(model, batch)
        if self.presto_weight == 0:
            return mean_nll_terms(model, batch, tokens)
        implementation = getattr(getattr(model, "module", model).config, "_attn_implementation", None)  # DDP wraps
        if implementation != ATTENTION_NAME:
            raise ValueError(f"presto needs the model loaded with attn_implementation={ATTENTION_NAME!r} "
                             f"(got {implementation!r})")
        prefill = batch["prefill_mask"].to(ids.device)
        with collect_prefill_mass(prefill) as collected:  # the kwarg also reaches checkpointed recomputation
            logits = model(ids, attention_mask=attention, **{PREFILL_KWARG: prefill}).logits
        nll, count = token_nll(logits, ids, loss_mask)
        penalty = presto_penalty(collected.stacked(), presto_query_mask(prefill, attention),
                                 layer_mean=self.presto_layer_mean)
        denominator = token_denominator(count, tokens)
        loss = (nll + self.presto_weight * penalty) / denominator
        return {"loss": loss, "nll": (nll / denominator).detach(), "presto": (penalty / denominator).detach()}


class KnowledgeReplay:
    """Another recipe with a share of each batch replaced by plain texts (loss on every text token), to
    keep a small model's pretraining knowledge through fine-tuning (the pretraining mix of InstructGPT's
    PPO-ptx, here for SFT, DA and PRESTO on the synthetic world).

    Each batch of ``batch_size`` holds ``round(batch_size · share)`` texts, drawn with replacement, and
    ``recipe``'s own sample of the rest; the loss terms are ``recipe``'s over the whole batch (the texts
    carry no prefill, so PRESTO's penalty does not see them)."""

    def __init__(self, recipe, tokenizer, texts: Sequence[str], share: float):
        if not 0.0 < share < 1.0:
            raise ValueError(f"replay share must be in (0, 1), got {share}")
        if not texts:
            raise ValueError("replay needs at least one text")
        if tokenizer.bos_token_id is None:
            raise ValueError("replay needs a tokenizer with a BOS token")
        self.recipe, self.share = recipe, share
        self.texts = [plain_text_item(tokenizer, text) for text in texts]
        self.name = recipe.name
        self.token_normalised = getattr(recipe, "token_normalised", False)

    def sample(self, rng: random.Random, batch_size: int) -> list[TrainingItem]:
        n_texts = min(batch_size - 1, round(batch_size * self.share))
        return self.recipe.sample(rng, batch_size - n_texts) + [self.texts[rng.randrange(len(self.texts))]
                                                                for _ in range(n_texts)]

    def longest(self) -> tuple[int, str]:
        length, index = longest_row(self.texts)
        inner = self.recipe.longest()
        return inner if inner[0] >= length else (length, f"replayed text {index + 1}")

    def loss_terms(self, model, batch, tokens: float | None = None) -> dict[str, torch.Tensor]:
        return self.recipe.loss_terms(model, batch, tokens)


class ConstrainedRecipe:
    """Token-wise constrained fine-tuning on chat rows against a frozen reference model."""

    token_normalised = True
    name = "constrained"

    def __init__(self, tokenizer, rows: Sequence[UtilityExample], reference_model, *, cache_reference: bool = True,
                 system: str | None = None, progress: bool = True):
        if not rows:
            raise ValueError("constrained needs at least one chat row")
        self.rows = list(rows)
        self.augmenter = SafetyRecoveryAugmenter(tokenizer, system=system)
        self.pad_id = tokenizer.pad_token_id
        self.reference = reference_model.eval().requires_grad_(False)
        self.cache: dict[int, torch.Tensor] | None = None
        if cache_reference:
            self.cache = {}
            for index in tqdm(range(len(self.rows)), desc="reference log-probs", disable=not progress):
                self.cache[index] = self._reference_logprobs([self.augmenter.utility(self.rows[index], index)])[0]

    @torch.no_grad()
    def _reference_logprobs(self, items: Sequence[TrainingItem]) -> torch.Tensor:
        """Target log-probs ``[n, T]`` of unpadded single items (n = 1) or a padded batch."""
        batch = make_batch(items, self.pad_id)
        ids, attention, _ = batch_inputs(self.reference, batch)
        return target_logprobs(self.reference(ids, attention_mask=attention).logits, ids).cpu()

    def sample(self, rng: random.Random, batch_size: int) -> list[TrainingItem]:
        indices = [rng.randrange(len(self.rows)) for _ in range(batch_size)]
        return [self.augmenter.utility(self.rows[i], i) for i in indices]

    def longest(self) -> tuple[int, str]:
        length, index = longest_row([self.augmenter.utility(row) for row in self.rows])
        return length, f"chat row {index + 1}"

    def loss_terms(self, model, batch, tokens: float | None = None) -> dict[str, torch.Tensor]:
        ids, attention, loss_mask = batch_inputs(model, batch)
        policy = target_logprobs(model(ids, attention_mask=attention).logits, ids)
        if self.cache is not None:  # left-pad each cached row to the batch length
            length = ids.shape[1]
            reference = torch.stack([torch.nn.functional.pad(self.cache[i], (length - len(self.cache[i]), 0))
                                     for i in batch["source"].tolist()]).to(ids.device)
        else:
            reference = target_logprobs(self.reference(ids, attention_mask=attention).logits, ids).detach()
        loss, count = constrained_token_loss(policy, reference, loss_mask)
        loss = loss / token_denominator(count, tokens)
        return {"loss": loss, "constrained": loss.detach()}
