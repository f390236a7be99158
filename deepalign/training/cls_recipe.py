"""Training with the explicit [CLS] safety signal (Li & Kim, ICML 2025): ``L + λ · L_cls``.

Two stages, each with its attention routing (:mod:`deepalign.models.safety_cls`):

* ``cls-pretrain``: language modelling on labelled plain texts (every token) mixed with labelled
  chat rows (loss on the response); [CLS] sees the whole row, nobody sees [CLS]; λ = 0.01. With
  ``window_probability > 0`` (our addition, off by default), [CLS] sees a random run of 3–10 content
  tokens of the row instead, so that re-classifying over inference windows is in distribution.
* ``cls-sft``: supervised fine-tuning on a balanced mixture, half malicious requests (label 1,
  answered with refusals) and half benign ones (label 0, answered); [CLS] sees the user's words,
  response tokens see [CLS]; λ = 0.1 (the paper also uses 0.01).

``L`` is the mean NLL over the supervised tokens of the batch; ``L_cls`` the mean binary
cross-entropy of the head's logit against the row labels. The model must carry the token and the
head (:func:`deepalign.models.safety_cls.add_safety_cls`) before the trainer builds its optimizer.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F

from deepalign.data.rows import UtilityExample
from deepalign.models.safety_cls import CLS_TOKEN, cls_forward, insert_cls, stage_visibility
from deepalign.training.augmentation import SafetyRecoveryAugmenter, TrainingItem
from deepalign.training.losses import token_nll
from deepalign.training.recipes import longest_row, plain_text_item

DEFAULT_WEIGHTS = {"pretrain": 0.01, "sft": 0.1}


class CLSRecipe:
    """``CLSRecipe(tokenizer, "pretrain", texts=[(text, label), …], malicious=…, benign=…)`` or
    ``CLSRecipe(tokenizer, "sft", malicious=[…], benign=[…])``; chat rows are
    :class:`~deepalign.data.rows.UtilityExample` (prompt, response). One process only: the
    safety head is applied outside the model's forward, where DDP would not synchronise its
    gradients."""

    single_process = True

    def __init__(self, tokenizer, stage: str, *, texts: Sequence[tuple[str, int]] = (),
                 malicious: Sequence[UtilityExample] = (), benign: Sequence[UtilityExample] = (),
                 cls_weight: float | None = None, chat_fraction: float = 0.5, system: str | None = None,
                 window_probability: float = 0.0, window_lengths: tuple[int, int] = (3, 10)):
        if stage not in DEFAULT_WEIGHTS:
            raise ValueError(f"stage must be 'pretrain' or 'sft', got {stage!r}")
        if CLS_TOKEN not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {CLS_TOKEN} token; call add_safety_cls(model, tokenizer) first")
        if not malicious or not benign:
            raise ValueError("the [CLS] recipes need malicious and benign chat rows (both labels)")
        if stage == "pretrain" and not texts:
            raise ValueError("cls-pretrain needs labelled texts")
        bad = [i for i, (_, label) in enumerate(texts) if label not in (0, 1)]
        if bad:
            raise ValueError(f"texts: labels must be 0 (benign) or 1 (malicious); text {bad[0] + 1} has {texts[bad[0]][1]!r}")
        if not 0.0 <= chat_fraction < 1.0:
            raise ValueError(f"chat_fraction must be in [0, 1), got {chat_fraction}")
        if not 0.0 <= window_probability <= 1.0 or (window_probability and stage != "pretrain"):
            raise ValueError(f"window_probability must be in [0, 1] and only applies to cls-pretrain, "
                             f"got {window_probability} for cls-{stage}")
        if not 1 <= window_lengths[0] <= window_lengths[1]:
            raise ValueError(f"window_lengths must be (min, max) with 1 ≤ min ≤ max, got {window_lengths}")
        self.window_probability, self.window_lengths = window_probability, window_lengths
        self.stage = stage
        self.name = f"cls-{stage}"
        self.cls_weight = DEFAULT_WEIGHTS[stage] if cls_weight is None else cls_weight
        if self.cls_weight < 0:
            raise ValueError(f"cls_weight must be non-negative, got {self.cls_weight}")
        self.cls_id = tokenizer.convert_tokens_to_ids(CLS_TOKEN)
        self.pad_id = tokenizer.pad_token_id
        self.chat_fraction = chat_fraction
        augmenter = SafetyRecoveryAugmenter(tokenizer, system=system)
        self.chats = {label: [_labelled(augmenter.utility(row), label) for row in rows]
                      for label, rows in ((1, malicious), (0, benign))}
        self.texts = [_labelled(plain_text_item(tokenizer, text), label) for text, label in texts]

    def sample(self, rng: random.Random, batch_size: int) -> list[TrainingItem]:
        n_chat = batch_size if self.stage == "sft" else round(batch_size * self.chat_fraction)
        n_malicious = n_chat // 2 + (rng.random() < 0.5 if n_chat % 2 else 0)  # balanced in expectation
        items = [self.texts[rng.randrange(len(self.texts))] for _ in range(batch_size - n_chat)]
        for label, count in ((1, n_malicious), (0, n_chat - n_malicious)):
            items += [self.chats[label][rng.randrange(len(self.chats[label]))] for _ in range(count)]
        return items

    def longest(self) -> tuple[int, str]:
        """Tokens of the longest row with its [CLS], and which row it is."""
        candidates = [(longest_row(rows), name) for rows, name in (
            (self.texts, "text"), (self.chats[1], "malicious row"), (self.chats[0], "benign row")) if rows]
        (length, index), name = max(candidates)
        return length + 1, f"{name} {index + 1}"

    def loss_terms(self, model, batch) -> dict[str, torch.Tensor]:
        head = getattr(model, "safety_head", None)
        if head is None or not any(p.requires_grad for p in head.parameters()):
            raise ValueError("the [CLS] recipes train the safety head: call add_safety_cls before the trainer, and "
                             "train full weights (LoRA adapters leave the head and the [CLS] embedding frozen)")
        device = next(model.parameters()).device
        widened = {k: v.to(device) if torch.is_tensor(v) else v
                   for k, v in insert_cls(batch, self.cls_id, self.pad_id).items()}
        visible = stage_visibility(widened, self.stage)
        if self.window_probability:
            visible = self._windowed(widened, visible)
        output, cls_logit = cls_forward(model, widened["input_ids"], visible, widened["position_ids"],
                                        widened["cls_index"])
        nll, count = token_nll(output.logits, widened["input_ids"], widened["loss_mask"])
        lm = nll / max(count, 1)
        labels = widened["label"].float()
        cls = F.binary_cross_entropy_with_logits(cls_logit, labels)
        accuracy = ((cls_logit > 0).float() == labels).float().mean()
        return {"loss": lm + self.cls_weight * cls, "nll": lm.detach(), "cls": cls.detach(),
                "cls_accuracy": accuracy.detach()}


    def _windowed(self, widened, visible: torch.Tensor) -> torch.Tensor:
        """With probability ``window_probability`` per row, [CLS] sees only a random run of
        ``window_lengths`` content tokens (the user's words and the response; never BOS or template
        tokens), as the inference windows show it. Draws come from torch's RNG (checkpointed)."""
        content = (widened["user_mask"] | widened["prefill_mask"] | widened["response_mask"]) & \
            widened["attention_mask"].bool() & ~widened["cls_mask"]
        visible = visible.clone()
        low, high = self.window_lengths
        for row in range(visible.shape[0]):
            if float(torch.rand(())) >= self.window_probability:
                continue
            positions = content[row].nonzero().flatten()
            length = min(int(torch.randint(low, high + 1, ())), len(positions))
            start = int(torch.randint(0, len(positions) - length + 1, ()))
            at = int(widened["cls_index"][row])
            visible[row, at] = False
            visible[row, at, at] = True
            visible[row, at, positions[start:start + length]] = True
        return visible


def _labelled(item: TrainingItem, label: int) -> TrainingItem:
    return TrainingItem(item.spans, item.loss_mask, item.prefill_length, item.source, label)
