"""Rank-Assisted Prefilling (Vega & Singh, Algorithm 1), batched over prompts with a KV cache.

From prompt + prefill, each step looks at the top ``k`` (20) next tokens (from
:func:`deepalign.kernels.topk_rank`) and asks a selector; with flag selectors the highest-ranked
harmful candidate is appended. With no harmful candidate the last selected token is undone (a
backtrack), and at that position only candidates ranked *below* the undone token are tried next.
A candidate whose text (stripped of spaces) equals that of each of the last two tokens is not
allowed (never a third repeat of the same string in a row, as in the authors' implementation).
A prompt stops when an end token is picked, after ``max_steps`` (256) steps, at
``max_new_tokens``, when nothing is left to select (a backtrack with no selected token), or when the
selector says stop. There is no sampling.

Batched execution keeps one KV cache for the whole batch. Every forward pass appends one slot per
prompt: the newly picked token, or a *hole* (attention mask 0) for a prompt that backtracked or
stopped. Undoing a token turns its slot into a hole, so the cache is rolled back without copying;
position ids count only real tokens, so each prompt sees exactly the sequence it would see alone.
Candidates at a position are kept, so a backtrack needs no forward pass. :func:`rap_attack_unbatched`
runs the same state machine one prompt at a time, recomputing the whole sequence at every step
(the baseline of the RAP benchmark, and the reference the batched version is tested against).
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from deepalign.attacks.selectors import BACKTRACK, Candidate, Selector
from deepalign.errors import InputError
from deepalign.kernels import topk_rank
from deepalign.models.cache import cache_kwargs, output_cache
from deepalign.models.chat import collate, render_chat
from deepalign.models.generation import end_token_ids


@dataclass(frozen=True)
class RAPConfig:
    """``k`` candidates shown per step, at most ``max_steps`` steps and ``max_new_tokens`` selected
    tokens per prompt; each a positive int (:class:`InputError` otherwise). A step is one pick or
    one backtrack. The defaults are the authors' (``DEFAULT_TOP_K = 20``, ``DEFAULT_MAX_STEPS = 256``
    in Vega & Singh's ``rap.py`` / ``auto_rap.py``, uiuc-focal-lab/push-forward-alignment)."""

    k: int = 20
    max_steps: int = 256
    max_new_tokens: int = 256

    def __post_init__(self):
        for name in ("k", "max_steps", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")


@dataclass
class RAPResult:
    """One prompt's attack: the selected tokens with their ranks, the text (prefill included),
    the counts of steps and backtracks, why it stopped and how long it took."""

    prompt: str
    prefill_tokens: list[int]
    tokens: list[int]
    ranks: list[int]
    text: str
    steps: int
    backtracks: int
    stopped: str  # "end", "budget", "max_tokens", "exhausted", "selector"
    seconds: float = 0.0


@dataclass
class _Row:
    """Algorithm 1's state for one prompt."""

    index: int
    selected: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    candidates: list[list[Candidate]] = field(default_factory=list)  # per position 0..len(selected)
    floors: list[int] = field(default_factory=list)  # per position: only ranks above this are tried
    slots: list[int] = field(default_factory=list)  # cache slot of each selected token (batched)
    prefix_tail: list[int] = field(default_factory=list)  # last two tokens of prompt + prefill
    undone_slot: int | None = None  # cache slot freed by the last backtrack (batched)
    steps: int = 0
    backtracks: int = 0
    stopped: str = ""

    def push_candidates(self, candidates: list[Candidate]) -> None:
        self.candidates.append(candidates)
        self.floors.append(-1)

    def step(self, selector: Selector, tokenizer, end_tokens: set[int], config: RAPConfig) -> int | None:
        """One step. Returns the picked token when a forward pass is needed for the next
        position, else ``None`` (backtrack, or the row stopped)."""
        position = len(self.selected)
        floor = self.floors[position]
        allowed = [c for c in self.candidates[position] if c.rank > floor]
        tail = (self.prefix_tail + self.selected)[-2:]
        if len(tail) == 2:
            last, before = (tokenizer.decode([t]).strip() for t in tail[::-1])
            if last == before:  # a third repeat of this string in a row is not allowed
                allowed = [c for c in allowed if tokenizer.decode([c.token]).strip() != last]
        self.steps += 1
        decision = selector.decide(self.index, self.selected, allowed) if allowed else BACKTRACK
        if decision.action == "stop":
            self.stopped = "selector"
            return None
        if decision.action == "backtrack":
            if not self.selected:
                self.stopped = "exhausted"
                return None
            self.backtracks += 1
            self.selected.pop()
            undone_rank = self.ranks.pop()
            self.candidates.pop()
            self.floors.pop()
            self.floors[-1] = undone_rank
            if self.slots:
                self.undone_slot = self.slots.pop()
            self._check_budget(config)
            return None
        choice = allowed[decision.index]
        self.selected.append(choice.token)
        self.ranks.append(choice.rank)
        if choice.token in end_tokens:
            self.stopped = "end"
        elif len(self.selected) >= config.max_new_tokens:
            self.stopped = "max_tokens"
        else:
            self._check_budget(config)
        return None if self.stopped else choice.token

    def _check_budget(self, config: RAPConfig) -> None:
        if self.steps >= config.max_steps:
            self.stopped = "budget"


def _end_tokens(tokenizer) -> set[int]:
    return set(end_token_ids(tokenizer))


def _candidates(logits: torch.Tensor, k: int, tokenizer) -> list[list[Candidate]]:
    """Ranked candidates ``[rows][≤ k]`` from last-position logits ``[rows, V]``; tokens with a
    ``-inf`` logit (a masked vocabulary) are never candidates."""
    result = topk_rank(logits.float(), k)
    probs = torch.exp(result.values.float() - result.logsumexp[:, None]).tolist()
    finite = torch.isfinite(result.values).tolist()
    indices = result.indices.tolist()
    return [[Candidate(t, r, p) for r, (t, p, ok) in enumerate(zip(row_t, row_p, row_ok)) if ok]
            for row_t, row_p, row_ok in zip(indices, probs, finite)]


def _result(row: _Row, prompt: str, prefill: list[int], tokenizer, seconds: float) -> RAPResult:
    return RAPResult(prompt, prefill, list(row.selected), list(row.ranks),
                     tokenizer.decode(prefill + row.selected, skip_special_tokens=True), row.steps,
                     row.backtracks, row.stopped, seconds)


@torch.no_grad()
def rap_attack(model, tokenizer, prompts: Sequence[str], prefills: Sequence[Sequence[int]], selector: Selector,
               config: RAPConfig = RAPConfig(), *, progress: bool = True, system: str | None = None) -> list[RAPResult]:
    """RAP on a batch of prompts with one KV cache; see the module docstring. ``system``: a system
    prompt (default: the chat template's own)."""
    if len(prompts) != len(prefills):
        raise InputError(f"prompts ({len(prompts)}) and prefills ({len(prefills)}) must have the same length")
    started = time.perf_counter()
    if hasattr(selector, "begin"):
        selector.begin(prompts, [list(f) for f in prefills])
    device = next(model.parameters()).device
    examples = [render_chat(tokenizer, p, prefill=list(f), close_turn=False, system=system)
                for p, f in zip(prompts, prefills)]
    context = max((getattr(model.config, "max_position_embeddings", None) or 10**9), 1)
    longest = max(len(e) for e in examples)
    if longest + config.max_new_tokens > context:
        raise InputError(f"a prompt with its prefill has {longest} tokens; with max_new_tokens = "
                         f"{config.max_new_tokens} it exceeds the model's context of {context}")
    window = getattr(model.config, "sliding_window", None)
    if window and longest + config.max_steps > window:
        # Sliding-window masks and caches count cache slots, holes included: a row could lose real
        # tokens it would see alone. The one-at-a-time path has no holes.
        raise InputError(f"batched RAP on a sliding-window model (window {window}) needs prompt + max_steps "
                         f"≤ window (here {longest} + {config.max_steps}); use rap_attack_unbatched")
    batch = collate(examples, tokenizer.pad_token_id)
    prompt_mask = batch["attention_mask"].to(device)
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp_min(0)
    out = model(batch["input_ids"].to(device), attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache, mask = output_cache(out), prompt_mask.clone()
    rows = [_Row(i, prefix_tail=list(e.input_ids[-2:])) for i, e in enumerate(examples)]
    for row, cands in zip(rows, _candidates(out.logits[:, -1], config.k, tokenizer)):
        row.push_candidates(cands)
    end_tokens = _end_tokens(tokenizer)
    bar = tqdm(total=len(rows), desc="RAP", disable=not progress)
    while any(not row.stopped for row in rows):
        fed = {}
        for row in rows:
            if row.stopped:
                continue
            token = row.step(selector, tokenizer, end_tokens, config)
            if row.undone_slot is not None:  # the undone token's slot becomes a hole
                mask[row.index, row.undone_slot] = 0
                row.undone_slot = None
            if token is not None:
                fed[row.index] = token
            if row.stopped:
                bar.update(1)
        if not fed:
            continue
        width = mask.shape[1]
        new_tokens = torch.full((len(rows), 1), tokenizer.pad_token_id, dtype=torch.long, device=device)
        new_column = torch.zeros((len(rows), 1), dtype=mask.dtype, device=device)
        fed_rows = sorted(fed)
        new_tokens[fed_rows, 0] = torch.tensor([fed[i] for i in fed_rows], device=device)
        new_column[fed_rows, 0] = 1
        mask = torch.cat([mask, new_column], dim=1)
        positions = (mask.sum(dim=1, keepdim=True) - 1).clamp_min(0)
        out = model(new_tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                    **cache_kwargs(model, cache))
        cache = output_cache(out)
        for index, cands in zip(fed_rows, _candidates(out.logits[fed_rows, -1], config.k, tokenizer)):
            rows[index].slots.append(width)
            rows[index].push_candidates(cands)
    bar.close()
    seconds = (time.perf_counter() - started) / max(len(rows), 1)
    return [_result(row, p, list(f), tokenizer, seconds) for row, p, f in zip(rows, prompts, prefills)]


@torch.no_grad()
def rap_attack_unbatched(model, tokenizer, prompts: Sequence[str], prefills: Sequence[Sequence[int]],
                         selector: Selector, config: RAPConfig = RAPConfig(), *,
                         next_logits: Callable[[str, list[int]], torch.Tensor] | None = None,
                         system: str | None = None) -> list[RAPResult]:
    """The same algorithm one prompt at a time, recomputing the whole sequence at every step.

    ``next_logits(prompt, prefill_tokens) -> [V]`` replaces the model as the oracle RAP queries:
    e.g. a defended model (:meth:`deepalign.models.cls_decoding.DefendedDecoder.next_token_logits`),
    which serves ``-inf`` for every token it will not emit."""
    device = next(model.parameters()).device
    end_tokens = _end_tokens(tokenizer)
    if hasattr(selector, "begin"):
        selector.begin(prompts, [list(f) for f in prefills])
    results = []
    for index, (prompt, prefill) in enumerate(zip(prompts, prefills)):
        started = time.perf_counter()
        base = list(render_chat(tokenizer, prompt, prefill=list(prefill), close_turn=False, system=system).input_ids)
        row = _Row(index, prefix_tail=base[-2:])

        def next_candidates(selected, prompt=prompt, prefill=list(prefill)):
            if next_logits is not None:
                return _candidates(next_logits(prompt, prefill + selected)[None], config.k, tokenizer)[0]
            ids = torch.tensor([base + selected], device=device)
            return _candidates(model(ids).logits[:, -1], config.k, tokenizer)[0]

        row.push_candidates(next_candidates([]))
        while not row.stopped:
            token = row.step(selector, tokenizer, end_tokens, config)
            if token is not None:
                row.push_candidates(next_candidates(row.selected))
        results.append(_result(row, prompt, list(prefill), tokenizer, time.perf_counter() - started))
    return results
