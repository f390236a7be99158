"""Decoding with the [CLS] safety signal: re-classification on a KV cache, strategic decoding.

One response at a time. The first pass reads ``[CLS] <bos> prompt prefill`` under the SFT routing
(:mod:`deepalign.models.safety_cls`); [CLS]'s verdict there is the first classification (the input
window), and that [CLS] is the signal every response token reads, as in training. Every later step
feeds the chosen token and, when the schedule asks for a re-classification, a *probe* [CLS] query
in the same forward pass: it attends to the window of :class:`~deepalign.models.cls_strategy.Strategy`
(the new token included) and nothing attends to it. So a re-classification costs one more query in a
pass the step makes anyway, and the response tokens never read a [CLS] state they were not trained
on; the probes' verdicts drive strategic decoding.

Cache slots are never moved: a probe, or a token withdrawn by strategic decoding after a confirmed
switch, is a masked *hole*, and position ids count real tokens only ([CLS] at 0). Each pass gets an
explicit 4-D mask.

:meth:`DefendedDecoder.next_token_logits` is the defended model seen as a next-token oracle for a
prompt + prefill (what a prefilling API serves): the model's logits, or, when the first
classification is malicious, only the lead-in's first token. RAP attacks that oracle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from deepalign.models.cache import cache_kwargs, output_cache
from deepalign.models.chat import collate, encode_text, render_chat
from deepalign.models.cls_strategy import Insertion, Strategy, StrategyConfig
from deepalign.models.generation import GREEDY, Sampling, end_token_ids, sample_next_token
from deepalign.models.safety_cls import additive_mask, cls_forward, cls_token_id, insert_cls, stage_visibility

DEFAULT_LEAD_IN = "Sorry, I cannot fulfill your request because"


@dataclass
class DefenseTrace:
    """What the defense did for one response: every verdict as ``(step, p(malicious))`` (step 0 is
    the first classification), the forward passes and how many of them re-classified, the lead-in
    insertion (content index and rule, if any) and the tokens withdrawn for it."""

    verdicts: list[tuple[int, float]] = field(default_factory=list)
    passes: int = 0
    classifications: int = 0
    insertion: Insertion | None = None
    withdrawn: int = 0
    seconds: float = 0.0


@dataclass
class DefendedOutput:
    text: str  # the assistant text, prefill included, up to the first end token
    tokens: list[int]  # response tokens (prefill, generated and inserted), end token excluded
    trace: DefenseTrace


@dataclass
class _Slot:
    kind: str  # "cls" or "token"
    alive: bool
    content: int | None  # content index (None: template token or [CLS])
    response: bool  # prefill / generated / inserted token (these read [CLS])


class DefendedDecoder:
    """``DefendedDecoder(model, tokenizer, StrategyConfig(...), lead_in=...)``. ``use_cls=False``
    decodes the same way with no [CLS] at all (plain decoding, the baseline of the overhead
    benchmark). ``record=True`` keeps, per cache slot, its token, position and visibility (the
    replay the tests check the cache against; quadratic in length)."""

    def __init__(self, model, tokenizer, config: StrategyConfig = StrategyConfig(), *,
                 lead_in: str = DEFAULT_LEAD_IN, system: str | None = None, use_cls: bool = True,
                 record: bool = False):
        self.model, self.tokenizer, self.config, self.system = model, tokenizer, config, system
        self.use_cls, self.record = use_cls, record
        self.cls_id = cls_token_id(model) if use_cls else None
        self.lead_in = encode_text(tokenizer, lead_in)
        if use_cls and config.strategic_decoding and not self.lead_in:
            raise ValueError("lead_in is empty: strategic decoding needs a refusal lead-in")
        self.ends = set(end_token_ids(tokenizer))
        self.device = next(model.parameters()).device
        self._served: _Decoding | None = None  # the last prompt served by next_token_logits

    # ----- one response -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt: str, prefill: Sequence[int] = (), sampling: Sampling = GREEDY, *,
                 max_new_tokens: int = 64, generator: torch.Generator | None = None,
                 stop_at_end: bool = True) -> DefendedOutput:
        """Decode after ``prompt`` and the forced ``prefill`` tokens; ``max_new_tokens`` bounds the
        tokens after the prefill (inserted ones included)."""
        started = time.perf_counter()
        state = _Decoding(self, prompt, list(prefill))
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is not None and state.position + max_new_tokens > context:
            raise ValueError(f"the prompt with its prefill and [CLS] takes {state.position} positions; with "
                             f"{max_new_tokens} new tokens it exceeds the model's context of {context}")
        step = 0
        while len(state.response) - len(state.prefill) < max_new_tokens:
            step += 1
            forced = bool(state.forced)
            token = state.forced.pop(0) if forced else sample_next_token(state.logits, sampling, generator)
            if stop_at_end and not forced and token in self.ends:
                break
            state.advance(token, step)
        state.trace.seconds = time.perf_counter() - started
        text = self.tokenizer.decode(state.response, skip_special_tokens=True)
        return DefendedOutput(text, list(state.response), state.trace)

    @torch.no_grad()
    def classify(self, prompt: str, prefill: Sequence[int] = ()) -> float:
        """p(malicious) of the first classification of ``prompt`` (the input window)."""
        if not self.use_cls:
            raise ValueError("classify needs use_cls=True")
        return _Decoding(self, prompt, list(prefill)).trace.verdicts[0][1]

    @torch.no_grad()
    def next_token_logits(self, prompt: str, prefill: Sequence[int]) -> torch.Tensor:
        """Logits ``[V]`` the defended model serves after ``prompt`` + ``prefill``: the model's, or
        ``-inf`` everywhere but the lead-in's first token when the first classification is malicious.

        Each call is a fresh prefilling request, computed incrementally: under the SFT routing
        [CLS] reads only the user's words, so the verdict does not depend on the prefill, and the
        state of the last prompt is kept and moved to the new prefill (tokens fed or cut off the cache)."""
        prefill = list(prefill)
        state = self._served
        if state is None or state.prompt != prompt:
            state = self._served = _Decoding(self, prompt, [])
        common = 0
        for a, b in zip(state.response, prefill):
            if a != b:
                break
            common += 1
        state.rewind(common)
        for token in prefill[common:]:
            state.advance(token, 0, classify=False)
        if state.forced:
            logits = torch.full_like(state.logits, float("-inf"))
            logits[state.forced[0]] = 0.0
            return logits
        return state.logits

    def generate_many(self, prompts: Sequence[str], prefills: Sequence[Sequence[int]], sampling: Sampling = GREEDY,
                      *, seed: int | None = None, max_new_tokens: int = 64, progress: bool = False
                      ) -> list[DefendedOutput]:
        if len(prompts) != len(prefills):
            raise ValueError(f"prompts ({len(prompts)}) and prefills ({len(prefills)}) must have the same length")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return [self.generate(p, f, sampling, max_new_tokens=max_new_tokens, generator=generator)
                for p, f in tqdm(list(zip(prompts, prefills)), desc="defended decoding", disable=not progress)]


class _Decoding:
    """The cache, the slots and the strategy of one response in progress."""

    @torch.no_grad()
    def __init__(self, decoder: DefendedDecoder, prompt: str, prefill: list[int]):
        self.decoder, self.prompt = decoder, prompt
        self.trace = DefenseTrace()
        self.prefill = prefill
        self.response = list(prefill)
        self.forced: list[int] = []
        spans = render_chat(decoder.tokenizer, prompt, prefill=prefill, close_turn=False, system=decoder.system)
        batch = collate([spans], decoder.tokenizer.pad_token_id or 0)
        user = batch["user_mask"][0].tolist()
        response = batch["prefill_mask"][0].tolist()
        self.n_input = sum(user)
        self.slots: list[_Slot] = []
        content = 0
        if decoder.use_cls:
            self.slots.append(_Slot("cls", True, None, False))
        for is_user, is_response in zip(user, response):
            index = content if (is_user or is_response) else None
            content += index is not None
            self.slots.append(_Slot("token", True, index, is_response))
        self.content_length = content
        # Per cache slot: token id, position id and what it saw (the replay a test checks us against).
        self.replay: tuple[list[int], list[int], list[list[bool]]] = ([], [], [])
        self.position = len(spans) + decoder.use_cls  # position id of the next token ([CLS] takes 0)
        model = decoder.model
        self.window_limit = getattr(model.config, "sliding_window", None)
        if decoder.use_cls:
            widened = insert_cls(batch, decoder.cls_id, decoder.tokenizer.pad_token_id or 0)
            widened = {k: v.to(decoder.device) if torch.is_tensor(v) else v for k, v in widened.items()}
            visible = stage_visibility(widened, "sft")
            output, cls_logit = cls_forward(model, widened["input_ids"], visible, widened["position_ids"],
                                            widened["cls_index"], use_cache=True, logits_to_keep=1)
            self._record(widened["input_ids"][0].tolist(), widened["position_ids"][0].tolist(), visible[0])
            p = float(torch.sigmoid(cls_logit[0]))
            self.trace.verdicts.append((0, p))
            self.trace.classifications += 1
            self.strategy = Strategy(decoder.config, self.n_input)
            self._apply(self.strategy.start(p >= decoder.config.threshold, self.content_length))
        else:
            ids = batch["input_ids"].to(decoder.device)
            output = model(ids, use_cache=True, logits_to_keep=1)
            self.strategy = None
            width = ids.shape[1]
            self._record(ids[0].tolist(), list(range(width)),
                         torch.ones(width, width, dtype=torch.bool).tril())
        self.trace.passes += 1
        self.cache = output_cache(output)
        self.logits = self.first_logits = output.logits[0, -1].float()
        self.fed: list[tuple[_Slot, torch.Tensor]] = []  # response tokens fed since, with their logits

    def rewind(self, keep: int) -> None:
        """Keep the first ``keep`` response tokens (``keep ≥`` the prefill given at construction);
        only for tokens fed with ``classify=False`` (their slots are the last ones of the cache)."""
        cut = len(self.response) - keep
        if cut <= 0:
            return
        if cut > len(self.fed) or any(slot is not self.slots[len(self.slots) - cut + i]
                                      for i, (slot, _) in enumerate(self.fed[-cut:])):
            raise ValueError("rewind can only remove tokens fed without re-classification")
        length = len(self.slots) - cut
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
        del self.slots[length:], self.response[keep:], self.fed[len(self.fed) - cut:]
        for part in self.replay:
            del part[length:]
        self.position -= cut
        self.content_length -= cut
        self.logits = self.fed[-1][1] if self.fed else self.first_logits

    @torch.no_grad()
    def advance(self, token: int, step: int, *, classify: bool = True) -> None:
        """Feed ``token`` (and a probe [CLS] when the schedule asks) in one pass; ``classify=False``
        feeds a forced prefill token (no schedule, no state change)."""
        decoder = self.decoder
        self.response.append(token)
        token_slot = _Slot("token", True, self.content_length, True)
        self.content_length += 1
        reclassify = classify and self.strategy is not None and self.strategy.due(step)
        queries: list[_Slot] = []
        ids, positions = [], []
        if reclassify:
            window = self.strategy.window(self.content_length)
            queries.append(_Slot("cls", True, None, False))
            ids.append(decoder.cls_id)
            positions.append(0)
        queries.append(token_slot)
        ids.append(token)
        positions.append(self.position)
        self.position += 1
        keys = self.slots + queries
        if self.window_limit and len(keys) > self.window_limit:
            raise ValueError(f"the defended sequence has {len(keys)} cache slots, more than the model's sliding "
                             f"window of {self.window_limit}")
        n_old = len(self.slots)
        rows = []
        for query in queries:
            if query.kind == "cls":  # the window, and itself
                rows.append([key is query or (key.alive and key.content is not None and key.content in window)
                             for key in keys])
            else:  # every live token before it, the first [CLS] (response tokens), itself; never a probe
                rows.append([key is query or (key.alive and k < n_old and (key.kind == "token" or query.response))
                             for k, key in enumerate(keys)])
        visible = torch.tensor(rows, dtype=torch.bool)
        output, cls_logit = self._forward(ids, positions, visible, reclassify)
        self._record(ids, positions, visible)
        if reclassify:
            queries[0].alive = False  # a probe is read by nobody
        self.slots.extend(queries)
        self.logits = output.logits[0, -1].float()
        if classify:
            self.fed.clear()  # generation steps are never rewound
        else:
            self.fed.append((token_slot, self.logits))
        if reclassify:
            p = float(torch.sigmoid(cls_logit[0]))
            self.trace.verdicts.append((step, p))
            self.trace.classifications += 1
            self._apply(self.strategy.observe(p >= decoder.config.threshold, step, self.content_length))

    def _forward(self, ids: list[int], positions: list[int], visible: torch.Tensor, with_cls: bool):
        """One pass over the queries ``ids`` (a probe [CLS] first when ``with_cls``) on the cache."""
        device, model = self.decoder.device, self.decoder.model
        self.trace.passes += 1
        inputs = torch.tensor([ids], device=device)
        position_ids = torch.tensor([positions], device=device)
        visible = visible[None].to(device)
        if with_cls:
            output, cls_logit = cls_forward(model, inputs, visible, position_ids,
                                            torch.zeros(1, dtype=torch.long, device=device),
                                            cache=self.cache, use_cache=True, logits_to_keep=1)
        else:
            dtype = next(model.parameters()).dtype
            output = model(inputs, attention_mask=additive_mask(visible, dtype), position_ids=position_ids,
                           use_cache=True, **cache_kwargs(model, self.cache))
            cls_logit = None
        self.cache = output_cache(output)
        return output, cls_logit

    def _record(self, ids: list[int], positions: list[int], visible: torch.Tensor) -> None:
        if not self.decoder.record:
            return
        self.replay[0].extend(ids)
        self.replay[1].extend(positions)
        self.replay[2].extend(row.tolist() for row in visible.cpu())

    def _apply(self, insertion: Insertion | None) -> None:
        """Withdraw the tokens from the insertion point on and queue the lead-in."""
        if insertion is None:
            return
        self.trace.insertion = insertion
        withdrawn = self.content_length - insertion.at
        if withdrawn:
            for slot in self.slots:
                if slot.content is not None and slot.content >= insertion.at:
                    slot.alive = False
            del self.response[len(self.response) - withdrawn:]
            self.position -= withdrawn
            self.content_length = insertion.at
            self.trace.withdrawn += withdrawn
        self.forced = list(self.decoder.lead_in)
