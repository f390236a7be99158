"""What the analyses read: (request, harmful answer) pairs and the tokens that start a refusal.

A :class:`HarmfulCorpus` comes from the synthetic world (:func:`world_corpus`: every harmful item
in two phrasings, with its correct harmful answer) or from a benchmark file (:func:`benchmark_corpus`:
each target with a harmful response, e.g. AdvBench's targets or Harmful HEx-PHI's answers, or a text
prefill). Refusal tokens are found in each model's own tokenizer (:meth:`HarmfulCorpus.refusal_ids`):
the first token of each refusal phrase, at the start of a text and after a space, so that a real
tokenizer never maps "sorry" to its unknown token and calls that a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from deepalign.data.benchmarks import read_benchmark
from deepalign.data.synthetic import SyntheticWorld
from deepalign.errors import InputError
from deepalign.models.chat import encode_text

WORLD_REFUSAL_WORDS = ("sorry", "cannot", "i")  # the synthetic world's refusals open with these
# How chat models' refusals open (deepalign's choice, not a paper's list: Qi et al.'s keyword phrases
# also hold words like "is" or "not" that match anywhere, which would make poor refusal tokens).
REFUSAL_OPENERS = ("I cannot", "I can't", "I'm sorry", "Sorry", "I apologize", "As an AI", "Unfortunately")


@dataclass(frozen=True)
class HarmfulCorpus:
    """``pairs``: (request, harmful answer); ``refusal_phrases``: texts whose first token starts a
    refusal; ``name``: where it came from (for report titles); ``choices``: for a word-level world,
    per pair and per answer word, the words equally correct there (``None``: only the word itself);
    ``copied``: for a word-level world, per pair, the indices of the answer words that repeat a choice
    made earlier in the same answer (:meth:`SyntheticWorld.copied_words`; ``None``: no such words)."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    refusal_phrases: tuple[str, ...]
    choices: tuple[tuple[tuple[str, ...], ...], ...] | None = None
    copied: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if not self.pairs:
            raise InputError(f"{self.name}: no (request, harmful answer) pairs to analyse")
        for field, value in (("choice lists", self.choices), ("copied-word lists", self.copied)):
            if value is not None and len(value) != len(self.pairs):
                raise ValueError(f"{self.name}: {len(value)} {field} for {len(self.pairs)} pairs")

    def copied_mask(self):
        """Bool ``[N]`` over the answers' words, pair after pair (the order of
        :func:`deepalign.analysis.knockout.knockout_ranks_over`'s ranks for a word-level tokenizer):
        True at the words of :attr:`copied`."""
        import torch

        if self.copied is None:
            raise ValueError(f"{self.name}: its answers repeat no earlier choice (no copied words)")
        lengths = [len(answer.split()) for _, answer in self.pairs]
        mask = torch.zeros(sum(lengths), dtype=torch.bool)
        start = 0
        for length, indices in zip(lengths, self.copied):
            if any(not 0 <= k < length for k in indices):
                raise ValueError(f"{self.name}: a copied-word index outside its answer of {length} words")
            mask[[start + k for k in indices]] = True
            start += length
        return mask

    def alternative_ids(self, tokenizer) -> list[list[list[int]]] | None:
        """:attr:`choices` as token ids of ``tokenizer`` (one id per word: word-level tokenizers only),
        for :func:`deepalign.analysis.knockout.knockout_ranks_over`; ``None`` without choices."""
        if self.choices is None:
            return None
        out = []
        for (_, answer), words in zip(self.pairs, self.choices):
            ids = [tokenizer.convert_tokens_to_ids(list(options)) for options in words]
            if len(ids) != len(encode_text(tokenizer, answer)):
                raise ValueError(f"{self.name}: choices are per word; this tokenizer splits words into several tokens")
            out.append(ids)
        return out

    def refusal_ids(self, tokenizer) -> list[int]:
        """The first token of each refusal phrase, alone and after a space, in ``tokenizer``
        (unknown-token and blank ids left out). Raises :class:`InputError` when none is left."""
        ids = set()
        for phrase in self.refusal_phrases:
            for text in (phrase, " " + phrase):
                encoded = encode_text(tokenizer, text)
                if encoded:
                    ids.add(encoded[0])
        ids.discard(getattr(tokenizer, "unk_token_id", None))
        ids = {i for i in ids if tokenizer.decode([i]).strip()}
        if not ids:
            raise InputError(f"none of the refusal phrases of {self.name} is a token of this tokenizer")
        return sorted(ids)


def world_corpus(world: SyntheticWorld, phrasings: Sequence[int] = (0, 1)) -> HarmfulCorpus:
    """Every harmful item's request in ``phrasings`` with its compliant answer (the stored one), per
    answer word the equally correct words (:meth:`SyntheticWorld.correct_words`) and the words that copy
    an earlier choice (:meth:`SyntheticWorld.copied_words`; world version 2)."""
    requests = [(item, p) for item in world.harmful_items() for p in phrasings]
    pairs = tuple((world.request(item, p), world.compliant_response(item)) for item, p in requests)
    choices = tuple(tuple(world.correct_words(item, answer)) for (item, _), (_, answer) in zip(requests, pairs))
    free = any(len(options) > 1 for words in choices for options in words)
    copied = tuple(tuple(world.copied_words(item, answer)) for (item, _), (_, answer) in zip(requests, pairs))
    return HarmfulCorpus(f"the synthetic world (version {world.version})", pairs, WORLD_REFUSAL_WORDS,
                         choices if free else None, copied if any(copied) else None)


def benchmark_corpus(path: str | Path, format: str | None = None, limit: int | None = None) -> HarmfulCorpus:
    """The targets of a benchmark file that carry a harmful response (or a text prefill, used as
    the harmful answer); refusal phrases: :data:`REFUSAL_OPENERS`."""
    targets = read_benchmark(path, format)
    pairs = tuple((t.prompt, t.harmful_response or t.prefill) for t in targets if t.harmful_response or t.prefill)
    if not pairs:
        raise InputError(f"{path}: no target has a harmful response or a prefill to analyse (use AdvBench, "
                         "JailbreakBench, Harmful HEx-PHI or a prompt,prefill file)")
    return HarmfulCorpus(Path(path).name, pairs[:limit] if limit else pairs, REFUSAL_OPENERS)
