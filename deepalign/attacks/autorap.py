"""AutoRAP: the classifier that replaces the human in Rank-Assisted Prefilling (Vega & Singh, App. B.3).

The recipe, as the authors' released code carries it out:

1. **Candidate refusal tokens.** Each harmful (prompt, response) row gets a prefill of the first
   ``U{1..|h|}`` response tokens; the target model's top ``k = 20`` next tokens after it are
   counted over all rows, and the tokens counted at least ``τ = 2`` times are the candidates
   (most frequent first).
2. **Refusal data.** For every row and every candidate token, the target model's greedy
   continuation after prompt + prefill + that token: what the model says once it takes that
   token (mostly refusals).
3. **Re-drawn augmentation.** Every time a row is used: the harmful response is cut, with
   probability ½, after a random sentence, else to ``U{min(10, 100, |h|) .. min(100, |h|)}``
   tokens; with probability ½ the first ``U{1..min(5, |s|)}`` tokens of one of the row's refusal
   continuations are appended. The label is 1 (harmful: keep going) without the refusal tokens and
   0 with them.
4. **Training.** A token-classification model reads the helper's chat template with the prompt and
   that prefill and is trained with cross-entropy on its last token only (AdamW, lr 2e-5 by
   default, linear decay).

At attack time :class:`~deepalign.attacks.selectors.ClassifierSelector` (``kind="token"``,
harmful label 1, ``prompts`` set) marks each top-20 candidate.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from deepalign.errors import FileFormatError
from deepalign.io import atomic_write_text, iter_jsonl
from deepalign.models.chat import encode_text, render_chat
from deepalign.models.generation import GREEDY, generate_after_prefill
from deepalign.training.augmentation import TrainingItem
from deepalign.training.recipes import batch_inputs, longest_row


@dataclass(frozen=True)
class AutoRAPRow:
    prompt: str
    harmful_response: str
    refusals: tuple[str, ...]  # the target model's continuations after each candidate token


@torch.no_grad()
def candidate_refusal_tokens(model, tokenizer, rows: Sequence[tuple[str, str]], *, k: int = 20, threshold: int = 2,
                             seed: int = 0) -> tuple[list[int], list[list[int]]]:
    """Step 1: ``(candidate token ids, the prefill drawn for each row)``."""
    from deepalign.kernels import topk_rank

    rng = random.Random(seed)
    prefills = []
    for _, harmful in rows:
        tokens = encode_text(tokenizer, harmful)
        if not tokens:
            raise ValueError("a row has an empty harmful response")
        prefills.append(tokens[: rng.randint(1, len(tokens))])
    counts: Counter = Counter()
    device = next(model.parameters()).device
    for (prompt, _), prefill in zip(rows, prefills):
        spans = render_chat(tokenizer, prompt, prefill=prefill, close_turn=False)
        logits = model(torch.tensor([spans.input_ids], device=device)).logits[:, -1].float()
        counts.update(topk_rank(logits, k).indices[0].tolist())
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [token for token, count in ordered if count >= threshold], prefills


def build_dataset(model, tokenizer, rows: Sequence[tuple[str, str]], *, k: int = 20, threshold: int = 2,
                  max_new_tokens: int = 512, seed: int = 0, progress: bool = True) -> list[AutoRAPRow]:
    """Steps 1 and 2 on the target model: rows with their refusal continuations."""
    candidates, prefills = candidate_refusal_tokens(model, tokenizer, rows, k=k, threshold=threshold, seed=seed)
    if not candidates:
        raise ValueError(f"no token appeared in the top {k} at least {threshold} times; use more rows")
    out = []
    for (prompt, harmful), prefill in tqdm(list(zip(rows, prefills)), desc="refusal data", disable=not progress):
        texts = generate_after_prefill(model, tokenizer, [prompt] * len(candidates),
                                       [prefill + [token] for token in candidates], GREEDY,
                                       max_new_tokens=max(1, max_new_tokens - 1))
        prefix = tokenizer.decode(prefill)
        refusals = tuple(text[len(prefix):] if text.startswith(prefix) else text for text in texts)
        out.append(AutoRAPRow(prompt, harmful, refusals))
    return out


def write_dataset(path: str | Path, rows: Sequence[AutoRAPRow]) -> Path:
    return atomic_write_text(path, "".join(json.dumps({"prompt": r.prompt, "harmful_response": r.harmful_response,
                                                       "refusals": list(r.refusals)}) + "\n" for r in rows))


def read_dataset(path: str | Path) -> list[AutoRAPRow]:
    rows = []
    for number, record in iter_jsonl(path, what="AutoRAP data file"):
        ok = isinstance(record, dict) and all(isinstance(record.get(f), str) for f in ("prompt", "harmful_response")) \
            and isinstance(record.get("refusals"), list) and all(isinstance(r, str) for r in record["refusals"])
        if not ok:
            raise FileFormatError(f"{path}:{number}: not an AutoRAP row (an object with strings prompt, "
                                  "harmful_response and a list of strings refusals)")
        rows.append(AutoRAPRow(record["prompt"], record["harmful_response"], tuple(record["refusals"])))
    if not rows:
        raise FileFormatError(f"{path}: the file has no rows")
    return rows


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def cut_after_random_sentence(text: str, rng: random.Random) -> str:
    """The text up to the end of a random one of its sentences (at least the first)."""
    sentences = [s for s in _SENTENCE_END.split(text) if s]
    return " ".join(sentences[: rng.randint(1, len(sentences))]).rstrip()


class AutoRAPRecipe:
    """Step 3 and 4 as a trainer recipe: items are the helper's chat rendering of prompt + drawn
    prefill, with the label on the last token. ``target_tokenizer`` tokenises the prefills."""

    name = "autorap"

    def __init__(self, helper_tokenizer, target_tokenizer, rows: Sequence[AutoRAPRow], *, max_prefill: int = 100,
                 min_prefill: int = 10, max_refusal_tokens: int = 5):
        if not rows:
            raise ValueError("autorap needs at least one row")
        self.helper, self.target, self.rows = helper_tokenizer, target_tokenizer, list(rows)
        self.max_prefill, self.min_prefill, self.max_refusal = max_prefill, min_prefill, max_refusal_tokens

    def draw(self, row: AutoRAPRow, rng: random.Random) -> tuple[str, int]:
        """One augmented ``(prefill text, label)`` for ``row`` (1 = harmful continuation)."""
        if rng.random() < 0.5:
            harmful = encode_text(self.target, cut_after_random_sentence(row.harmful_response, rng))
        else:
            harmful = encode_text(self.target, row.harmful_response)
            longest = min(self.max_prefill, len(harmful))
            harmful = harmful[: rng.randint(min(self.min_prefill, longest), longest)]
        refusal = encode_text(self.target, row.refusals[rng.randrange(len(row.refusals))]) if row.refusals else []
        add_refusal = rng.random() < 0.5 and bool(refusal)
        extra = refusal[: rng.randint(1, min(self.max_refusal, len(refusal)))] if add_refusal else []
        return self.target.decode(harmful + extra), 0 if add_refusal else 1

    def item(self, prompt: str, prefill: str, label: int) -> TrainingItem:
        spans = render_chat(self.helper, prompt, prefill=prefill, close_turn=False)
        mask = torch.zeros(len(spans), dtype=torch.bool)
        mask[-1] = True
        return TrainingItem(spans, mask, spans.prefill.stop - spans.prefill.start, label=label)

    def sample(self, rng: random.Random, batch_size: int) -> list[TrainingItem]:
        items = []
        for _ in range(batch_size):
            row = self.rows[rng.randrange(len(self.rows))]
            items.append(self.item(row.prompt, *self.draw(row, rng)))
        return items

    def longest(self) -> tuple[int, str]:
        length, index = longest_row([self.item(r.prompt, r.harmful_response, 1) for r in self.rows])
        return length + self.max_refusal, f"autorap row {index + 1}"

    def loss_terms(self, model, batch) -> dict[str, torch.Tensor]:
        ids, attention, _ = batch_inputs(model, batch)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -1].float()  # left padding: last = real
        labels = batch["label"].to(ids.device)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}
