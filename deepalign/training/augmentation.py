"""Safety-recovery data augmentation (Qi et al., ICLR 2025) and the utility anchor.

Each safety example (a harmful prompt ``x``, a harmful response ``h`` and a refusal ``r``) is
rendered, every time it is used, as

* with probability ½: ``x`` + the first ``k`` tokens of ``h`` (as a prefill) + ``r``, with ``k``
  drawn uniformly from ``{1, …, min(100, |h|)}``;
* otherwise: ``x`` + ``r``.

The loss covers the refusal tokens and the end of the turn only (never the prompt or the harmful
prefix). Utility examples (a benign prompt and its answer) are mixed in with the loss on the
answer and end of turn; the training loss is the mean over all supervised tokens of the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from deepalign.data.rows import SafetyExample, UtilityExample
from deepalign.models.chat import ChatSpans, encode_text, render_chat


@dataclass(frozen=True)
class TrainingItem:
    """A rendered example: its spans, the bool ``[T]`` loss mask over target tokens, the prefill
    length and, where a recipe needs them, the index of the data row it came from and a class label."""

    spans: ChatSpans
    loss_mask: torch.Tensor
    prefill_length: int
    source: int = -1
    label: int = -1


class SafetyRecoveryAugmenter:
    """Renders safety and utility examples as DA prescribes. ``augment_probability`` (½) and
    ``max_prefill`` (100) are the paper's values; the random draws come from the ``rng`` passed
    to :meth:`safety`, so a trainer that checkpoints its RNG resumes the same sequence."""

    def __init__(self, tokenizer, *, augment_probability: float = 0.5, max_prefill: int = 100,
                 system: str | None = None):
        if not 0.0 <= augment_probability <= 1.0:
            raise ValueError(f"augment_probability must be in [0, 1], got {augment_probability}")
        if max_prefill < 1:
            raise ValueError(f"max_prefill must be at least 1, got {max_prefill}")
        self.tokenizer = tokenizer
        self.augment_probability = augment_probability
        self.max_prefill = max_prefill
        self.system = system

    def prefill_length(self, harmful_tokens: int, rng: random.Random) -> int:
        """0 (no augmentation) with probability 1 − p, else k ~ U{1, …, min(max_prefill, |h|)}."""
        if harmful_tokens == 0 or rng.random() >= self.augment_probability:
            return 0
        return rng.randint(1, min(self.max_prefill, harmful_tokens))

    def safety(self, example: SafetyExample, rng: random.Random | None, *, prefill: int | None = None) -> TrainingItem:
        """Render a safety example; ``prefill`` fixes the number of harmful tokens (capped at
        ``|h|``) instead of drawing it from ``rng``."""
        harmful = encode_text(self.tokenizer, example.harmful_response)
        k = min(prefill, len(harmful)) if prefill is not None else self.prefill_length(len(harmful), rng)
        spans = render_chat(self.tokenizer, example.prompt, prefill=harmful[:k], response=example.refusal,
                            system=self.system)
        return TrainingItem(spans, spans.mask("response", "end"), k)

    def utility(self, example: UtilityExample, source: int = -1) -> TrainingItem:
        spans = render_chat(self.tokenizer, example.prompt, response=example.response, system=self.system)
        return TrainingItem(spans, spans.mask("response", "end"), 0, source)
