"""Selectors for Rank-Assisted Prefilling: which of the ranked next-token candidates are "harmful".

A selector sees, for one prompt, the tokens selected so far and the ranked candidates still
allowed at this step, and answers with a :class:`Decision`: pick one candidate, backtrack, or
stop. Flag-based selectors (lexicon, oracle, callable, classifier) mark each candidate harmful or
not, and Algorithm 1 takes the highest-ranked harmful one; the human console lets a person choose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence


@dataclass(frozen=True)
class Candidate:
    """A next-token candidate: its id, 0-based rank and probability (decode ``token`` for text)."""

    token: int
    rank: int
    probability: float


@dataclass(frozen=True)
class Decision:
    """``pick`` (index into the allowed candidates), ``backtrack`` or ``stop``."""

    action: str
    index: int = -1

    @staticmethod
    def pick(index: int) -> "Decision":
        return Decision("pick", index)


BACKTRACK = Decision("backtrack")
STOP = Decision("stop")


class Selector(Protocol):
    """What RAP asks at each step. A selector may also define ``begin(prompts, prefills)``,
    called once per batch with the prompts and the prefill token ids of rows 0, 1, …"""

    def decide(self, row: int, context: Sequence[int], candidates: Sequence[Candidate]) -> Decision:
        """``context``: token ids selected so far (after the prompt and prefill)."""


class FlagSelector:
    """Algorithm 1's rule on top of per-candidate harmful flags: the highest-ranked harmful
    candidate, or a backtrack when there is none."""

    def flags(self, row: int, context: Sequence[int], candidates: Sequence[Candidate]) -> list[bool]:
        raise NotImplementedError

    def decide(self, row: int, context: Sequence[int], candidates: Sequence[Candidate]) -> Decision:
        for index, harmful in enumerate(self.flags(row, context, candidates)):
            if harmful:
                return Decision.pick(index)
        return BACKTRACK


class LexiconSelector(FlagSelector):
    """Harmful unless the candidate's token is in ``blocked`` (e.g. refusal words), or it completes
    one of the token sequences in ``blocked_sequences`` (a refusal word that the tokenizer splits:
    ``unable`` = ``un`` + ``able`` blocks ``able`` after ``un``, not every word starting with ``un``);
    when ``allowed`` is given, harmful only if it is in ``allowed``."""

    def __init__(self, blocked: Iterable[int] = (), allowed: Iterable[int] | None = None,
                 blocked_sequences: Iterable[Sequence[int]] = ()):
        self.blocked = set(blocked)
        self.allowed = None if allowed is None else set(allowed)
        self.sequences = {tuple(seq) for seq in blocked_sequences if len(seq) > 1}
        self.blocked |= {seq[0] for seq in blocked_sequences if len(seq) == 1}

    def _completes(self, context: Sequence[int], token: int) -> bool:
        return any(seq[-1] == token and tuple(context[len(context) - len(seq) + 1:]) == seq[:-1]
                   for seq in self.sequences if len(context) >= len(seq) - 1)

    def flags(self, row, context, candidates):
        return [c.token not in self.blocked and not self._completes(context, c.token)
                and (self.allowed is None or c.token in self.allowed) for c in candidates]


def word_sequences(tokenizer, words: Iterable[str]) -> list[list[int]]:
    """The token sequences of each word at the start of a text and after a space."""
    from deepalign.models.chat import encode_text

    return [ids for word in words for ids in (encode_text(tokenizer, word), encode_text(tokenizer, " " + word)) if ids]


class CallableSelector(FlagSelector):
    """Wraps ``fn(context_ids, candidate) -> bool`` (any Python callable)."""

    def __init__(self, fn: Callable[[Sequence[int], Candidate], bool]):
        self.fn = fn

    def flags(self, row, context, candidates):
        return [bool(self.fn(context, c)) for c in candidates]


class ClassifierSelector(FlagSelector):
    """A local Hugging Face classifier decides: each candidate is appended to the row's prefill and
    the tokens selected so far, decoded with the attacked model's tokenizer, and classified — the
    input AutoRAP's classifier gets in Vega & Singh's ``auto_rap.py`` (prefill + generated tokens +
    candidate, the prompt as the user turn).

    ``kind="sequence"``: a sequence-classification model scores the whole text; ``kind="token"``:
    a token-classification model scores its last token. ``harmful_labels``: the label names (from
    the model's ``id2label``) or ids that mean "harmful" (AutoRAP's classifier: label 1). A
    candidate is harmful when the probability of those labels is at least ``threshold``.

    With ``chat=True`` the classifier reads its own chat template, the prompt as the user turn and
    the response so far plus the candidate as the assistant's prefill (AutoRAP's input); the
    attack calls :meth:`begin` with the batch's prompts and prefills."""

    def __init__(self, model, tokenizer, attacked_tokenizer, harmful_labels, *, kind: str = "sequence",
                 threshold: float = 0.5, prefix: str = "", chat: bool = False):
        if kind not in ("sequence", "token"):
            raise ValueError(f"kind must be 'sequence' or 'token', got {kind!r}")
        labels = getattr(model.config, "id2label", {}) or {}
        by_name = {str(name): int(index) for index, name in labels.items()}
        self.label_ids = []
        for label in harmful_labels:
            if isinstance(label, int):
                self.label_ids.append(label)
            elif label in by_name:
                self.label_ids.append(by_name[label])
            else:
                raise ValueError(f"unknown label {label!r}; the classifier's labels are {sorted(by_name)}")
        self.model, self.tokenizer, self.attacked = model.eval(), tokenizer, attacked_tokenizer
        self.kind, self.threshold, self.prefix, self.chat = kind, threshold, prefix, chat
        self.prompts: list[str] = []
        self.prefills: list[list[int]] = []

    def begin(self, prompts, prefills=None) -> None:
        """The prompts and prefill token ids of the rows about to be attacked (row i ↔ prompts[i])."""
        self.prompts = list(prompts)
        self.prefills = [list(p) for p in prefills] if prefills is not None else [[] for _ in self.prompts]

    def _ids(self, row: int, text: str) -> list[int]:
        if not self.chat:
            return self.tokenizer(self.prefix + text, add_special_tokens=True)["input_ids"]
        from deepalign.models.chat import render_chat

        if row >= len(self.prompts):
            raise ValueError("ClassifierSelector(chat=True) needs begin(prompts) before the attack")
        return list(render_chat(self.tokenizer, self.prompts[row], prefill=text, close_turn=False).input_ids)

    def flags(self, row, context, candidates):
        import torch

        if not candidates:
            return []
        prefill = self.prefills[row] if row < len(self.prefills) else []
        sequences = [self._ids(row, self.attacked.decode(prefill + list(context) + [c.token])) for c in candidates]
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences])  # left padding
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        if self.kind == "token":
            logits = logits[:, -1]  # left padding: the last column is each row's last real token
        probs = torch.softmax(logits.float(), dim=-1)[:, self.label_ids].sum(dim=-1)
        return (probs >= self.threshold).tolist()


class SyntheticOracle(LexiconSelector):
    """The synthetic world's oracle (an attacker who knows what a refusal looks like): every word
    that occurs in a refusal but never in a compliant answer is blocked; the rest (recipe words,
    punctuation) counts as harmful. The end of the turn counts as harmful only once the response
    states a recipe step (:meth:`SyntheticWorld.states_step`): an attacker does not end an answer that has
    not given anything yet."""

    def __init__(self, world, tokenizer):
        from deepalign.models.generation import end_token_ids

        compliant = {w for item in world.items.values() for w in world.compliant_response(item).split()}
        refusal_words = {w for text in world.refusal_templates for w in text.format(item="x").split()} - compliant - {"x"}
        super().__init__(blocked=tokenizer.convert_tokens_to_ids(sorted(refusal_words)))
        self.tokenizer, self.ends, self.world = tokenizer, set(end_token_ids(tokenizer)), world

    def flags(self, row, context, candidates):
        words = self.tokenizer.decode(list(context), skip_special_tokens=True).split()
        has_step = self.world.states_step(words)
        return [ok and (has_step or c.token not in self.ends)
                for ok, c in zip(super().flags(row, context, candidates), candidates)]


def synthetic_oracle(world, tokenizer) -> SyntheticOracle:
    """:class:`SyntheticOracle` for ``world``."""
    return SyntheticOracle(world, tokenizer)


class ConsoleSelector:
    """A person at the terminal picks: a number selects that candidate, ``b`` backtracks, ``s``
    skips (stops) this prompt. Shows the text so far and the ranked candidates with probabilities."""

    def __init__(self, tokenizer, *, read: Callable[[str], str] = input, write: Callable[[str], None] = print):
        self.tokenizer, self.read, self.write = tokenizer, read, write

    def decide(self, row, context, candidates):
        self.write(f"\n[prompt {row}] so far: {self.tokenizer.decode(list(context))!r}")
        for index, c in enumerate(candidates):
            self.write(f"  {index:>2}. rank {c.rank:>2}  p={c.probability:.4f}  {self.tokenizer.decode([c.token])!r}")
        while True:
            answer = self.read("pick a number, b = backtrack, s = skip: ").strip().lower()
            if answer == "b":
                return BACKTRACK
            if answer == "s":
                return STOP
            if answer.isdigit() and int(answer) < len(candidates):
                return Decision.pick(int(answer))
            self.write(f"  not understood: {answer!r}")
