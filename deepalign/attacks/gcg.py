"""GCG, Greedy Coordinate Gradient (Zou et al., 2023): an adversarial suffix after the user's words
that makes the model start its answer with a target string ("Sure, here is …").

The token layout of one attack (from :func:`deepalign.models.chat.render_chat`'s exact spans)::

    [ before: template head + the user's words | suffix (optimised) | after: end of the user's turn
      + assistant header | target ]

The suffix's tokens follow the user's tokens directly, as nanoGCG appends its ``{optim_str}`` to
the last message. Each step (nanoGCG 0.3.0's algorithm with ``buffer_size=0``, which is its
default):

1. the gradient of the target loss (mean cross-entropy of the target tokens) with respect to the
   one-hot matrix of the suffix tokens (``[L, V]``);
2. per suffix position the ``topk`` tokens with the most negative gradient (forbidden tokens
   excluded); with ``topk`` ≤ 64 from :func:`deepalign.kernels.topk_rank`, else ``torch.topk``;
3. ``search_width`` candidates, each the suffix with ``n_replace`` random positions replaced by a
   random one of their top-k tokens (the same random draws as nanoGCG: ``torch.rand`` for the
   positions, then ``torch.randint`` for the tokens, from a generator seeded with ``seed``);
4. candidates whose text does not tokenise back to the same ids are dropped (``filter_ids``);
5. every candidate's target loss, in batches, on the **cached prompt prefix**: the KV cache of the
   tokens before the suffix is computed once per attack, and each batch runs only suffix + after +
   target on a copy of it (``prefix_cache=False`` recomputes the whole prompt for each candidate,
   the baseline of ``benchmarks/gcg_prefix_cache.py``);
6. the lowest-loss candidate becomes the suffix. With ``early_stop`` a step where some candidate
   makes the model's greedy prediction equal to the whole target takes the lowest-loss such
   candidate and ends the attack (nanoGCG stops after its argmin candidate in that case).

The result is the suffix of the step with the lowest loss (the matching one when the attack stopped
early), with the loss of every step. nanoGCG itself cannot be used with transformers 5: its prefix
cache indexes the ``DynamicCache`` as a tuple of tuples (``TypeError: 'DynamicCache' object is not
subscriptable``) and the package pins ``transformers<=4.47.1``; tests check that this
implementation follows nanoGCG's loss trajectory (nanoGCG without its cache) under one seed.

Defaults are nanoGCG 0.3.0's ``GCGConfig`` (the GCG paper's settings): 250 steps, search width 512,
top-k 256, one replaced token per candidate, suffix ``"x x x x x x x x x x x x x x x x x x x x"``
(20 tokens on most tokenizers), non-ASCII tokens excluded, candidates filtered by retokenisation.
Unlike nanoGCG, every special token of the tokenizer is excluded too (``forbid_special``; nanoGCG
excludes only BOS, EOS, pad and unknown), so a suffix cannot contain chat-template role markers,
and early stopping is on by default.
"""

from __future__ import annotations

import copy
import numbers
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from deepalign.errors import InputError
from deepalign.models.cache import cache_kwargs, output_cache
from deepalign.models.chat import encode_text, render_chat

DEFAULT_SUFFIX = " ".join(["x"] * 20)  # nanoGCG's optim_str_init
DEFAULT_TARGET = "Sure, here is"
TOPK_KERNEL_MAX = 64  # the largest k topk_rank takes


@dataclass(frozen=True)
class GCGConfig:
    """GCG's settings (defaults: nanoGCG 0.3.0's ``GCGConfig``, see the module docstring).

    ``batch_size``: candidates per forward pass (``None``: all of them at once; it changes speed and
    memory, never the result). ``prefix_cache``: evaluate candidates on the cached prompt prefix.
    ``seed``: seeds the candidate draws (a ``torch.Generator`` of the model's device)."""

    num_steps: int = 250
    search_width: int = 512
    topk: int = 256
    n_replace: int = 1
    suffix_init: str = DEFAULT_SUFFIX
    batch_size: int | None = None
    early_stop: bool = True
    prefix_cache: bool = True
    allow_non_ascii: bool = False
    forbid_special: bool = True
    filter_ids: bool = True
    seed: int = 0

    def __post_init__(self):
        for name in ("num_steps", "search_width", "topk", "n_replace"):
            _check_positive(name, getattr(self, name))
        if self.batch_size is not None:
            _check_positive("batch_size", self.batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise InputError(f"seed must be an int ≥ 0, got {self.seed!r}")
        if not isinstance(self.suffix_init, str) or not self.suffix_init.strip():
            raise InputError(f"suffix_init must be a non-empty string, got {self.suffix_init!r}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class SuffixLayout:
    """Token ids around the suffix: ``before`` (template head and the user's words), ``after`` (the
    rest of the prompt up to the assistant's content) and ``target``."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    target: tuple[int, ...]

    def prompt_ids(self, suffix: Sequence[int]) -> list[int]:
        """The prompt the model answers with ``suffix`` in place (no target)."""
        return [*self.before, *suffix, *self.after]


def suffix_layout(tokenizer, prompt: str, target: str, *, system: str | None = None) -> SuffixLayout:
    """The layout of ``prompt`` + suffix → ``target`` in the tokenizer's chat template (exact spans
    of :func:`render_chat`; the target is the assistant's prefill). Refuses an empty target."""
    if not isinstance(target, str) or not target.strip():
        raise InputError(f"the GCG target must be a non-empty string, got {target!r}")
    spans = render_chat(tokenizer, prompt, prefill=target, close_turn=False, system=system)
    ids = spans.input_ids
    user_end = spans.user.stop if spans.user is not None else spans.prompt.stop
    target_ids = ids[spans.prefill]
    if not target_ids:
        raise InputError(f"the target {target!r} has no tokens")
    return SuffixLayout(tuple(ids[:user_end]), tuple(ids[user_end:spans.prompt.stop]), tuple(target_ids))


def forbidden_tokens(tokenizer, vocab_size: int, *, allow_non_ascii: bool = False,
                     forbid_special: bool = True) -> torch.Tensor:
    """Bool ``[vocab_size]``: tokens a suffix may not use. As nanoGCG's ``get_nonascii_toks``: a
    token whose text is not printable ASCII (unless ``allow_non_ascii``), and BOS, EOS, pad and
    unknown; also every id the tokenizer does not have (embedding rows beyond it) and, with
    ``forbid_special``, every special token."""
    out = torch.zeros(vocab_size, dtype=torch.bool)
    known = min(len(tokenizer), vocab_size)
    out[known:] = True
    if not allow_non_ascii:
        size = min(getattr(tokenizer, "vocab_size", known) or known, known)
        for token in range(size):
            text = tokenizer.decode([token])
            if not (text.isascii() and text.isprintable()):
                out[token] = True
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    if forbid_special:
        special += list(getattr(tokenizer, "all_special_ids", []))
    for token in special:
        if token is not None and 0 <= token < vocab_size:
            out[token] = True
    return out


def check_topk(config: GCGConfig, forbidden: torch.Tensor) -> None:
    """Refuse a ``topk`` larger than the number of tokens a suffix may use."""
    allowed = int((~forbidden).sum())
    if config.topk > allowed:
        raise InputError(f"topk = {config.topk} exceeds the {allowed} tokens a suffix may use")


def _embed_scale(embedding):
    """The factor a scaled embedding (Gemma) multiplies its rows by, or ``None``."""
    return getattr(embedding, "embed_scale", None)


class SuffixScorer:
    """The target loss of suffixes for one layout, on a cached prompt prefix or recomputed.

    ``losses(candidates)`` evaluates ``[N, L]`` suffixes in batches; ``gradient(suffix)`` is the
    gradient of the loss with respect to the suffix's one-hot matrix. With ``prefix_cache`` the KV
    cache of ``before`` is computed once here; every forward pass runs on a copy of it (the
    forward appends to the cache it is given), so the prefix is never recomputed."""

    def __init__(self, model, layout: SuffixLayout, *, prefix_cache: bool = True):
        self.model = model
        self.layout = layout
        self.device = next(model.parameters()).device
        self.embedding = model.get_input_embeddings()
        as_tensor = lambda ids: torch.tensor([list(ids)], dtype=torch.long, device=self.device)  # noqa: E731
        self.before, self.after, self.target = (as_tensor(x) for x in (layout.before, layout.after, layout.target))
        self.cache = None
        if prefix_cache:
            if not layout.before:
                raise InputError("the prompt prefix before the suffix is empty; nothing to cache")
            with torch.no_grad():
                self.cache = output_cache(model(self.before, use_cache=True, logits_to_keep=1))

    def _cache_for(self, rows: int):
        cache = copy.deepcopy(self.cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache

    def _forward(self, rows: int, *, ids=None, embeds=None):
        """Logits ``[rows, len(target), V]`` of the target positions for inputs that hold
        suffix + after + target (with the cached prefix) or the whole sequence (without); the last
        target token is not fed, since nothing is predicted from it."""
        target_len = self.target.shape[1]
        kwargs = {"logits_to_keep": target_len}
        if self.cache is not None:
            kwargs.update(use_cache=True, **cache_kwargs(self.model, self._cache_for(rows)))
        else:
            kwargs["use_cache"] = False
        if embeds is not None:
            return self.model(inputs_embeds=embeds, **kwargs).logits
        return self.model(ids, **kwargs).logits

    def _tail(self, rows: int) -> torch.Tensor:
        return torch.cat([self.after, self.target[:, :-1]], dim=1).expand(rows, -1)

    @torch.no_grad()
    def losses(self, candidates: torch.Tensor, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss [N], matched [N])``: each suffix's mean target cross-entropy (float32) and
        whether the model's greedy prediction at every target position is the target token."""
        candidates = candidates.to(self.device)
        size = batch_size or candidates.shape[0]
        losses, matched = [], []
        for start in range(0, candidates.shape[0], size):
            chunk = candidates[start:start + size]
            rows = chunk.shape[0]
            parts = [chunk, self._tail(rows)] if self.cache is not None else \
                [self.before.expand(rows, -1), chunk, self._tail(rows)]
            logits = self._forward(rows, ids=torch.cat(parts, dim=1)).float()
            labels = self.target.expand(rows, -1)
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)
            losses.append(loss)
            matched.append((logits.argmax(dim=-1) == labels).all(dim=1))
        return torch.cat(losses), torch.cat(matched)

    def embeds_loss(self, suffix_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, matched)`` of one suffix given as input embeddings ``[1, L, d]`` (differentiable
        with respect to them)."""
        with torch.no_grad():
            tail = self.embedding(self._tail(1))
            head = None if self.cache is not None else self.embedding(self.before)
        parts = [suffix_embeds, tail] if head is None else [head, suffix_embeds, tail]
        logits = self._forward(1, embeds=torch.cat(parts, dim=1))[0].float()
        loss = torch.nn.functional.cross_entropy(logits, self.target[0])
        return loss, (logits.argmax(dim=-1) == self.target[0]).all()

    def gradient(self, suffix: torch.Tensor) -> torch.Tensor:
        """``[L, V]``: d(target loss) / d(one-hot of ``suffix``), in the embedding's dtype."""
        weight = self.embedding.weight
        one_hot = torch.nn.functional.one_hot(suffix.to(self.device), weight.shape[0]).to(weight.dtype)
        one_hot.requires_grad_(True)
        suffix_embeds = (one_hot @ weight)[None]
        scale = _embed_scale(self.embedding)
        if scale is not None:
            suffix_embeds = suffix_embeds * (scale.to(weight.dtype) if torch.is_tensor(scale) else scale)
        loss, _ = self.embeds_loss(suffix_embeds)
        (grad,) = torch.autograd.grad(loss, [one_hot])
        return grad


def top_tokens(grad: torch.Tensor, forbidden: torch.Tensor, topk: int) -> torch.Tensor:
    """``[L, topk]``: per position the tokens with the most negative gradient, best first,
    forbidden tokens never among them (``topk_rank`` for k ≤ 64, ``torch.topk`` above)."""
    scores = (-grad.float()).masked_fill(forbidden.to(grad.device)[None], float("-inf"))
    if topk <= TOPK_KERNEL_MAX:
        from deepalign.kernels import topk_rank

        return topk_rank(scores, topk).indices
    return scores.topk(topk, dim=1).indices


def sample_candidates(suffix: torch.Tensor, top: torch.Tensor, search_width: int, n_replace: int,
                      generator: torch.Generator) -> torch.Tensor:
    """``[search_width, L]`` suffixes: ``n_replace`` distinct random positions of ``suffix`` each
    replaced by a uniformly drawn one of that position's ``top`` tokens."""
    length, k = top.shape
    device = top.device
    positions = torch.argsort(torch.rand((search_width, length), generator=generator, device=device),
                              dim=1)[:, :n_replace]
    picks = torch.randint(0, k, (search_width, n_replace, 1), generator=generator, device=device)
    values = torch.gather(top[positions], 2, picks).squeeze(2)
    return suffix.to(device).repeat(search_width, 1).scatter_(1, positions, values)


def retokenizes(tokenizer, candidates: torch.Tensor) -> torch.Tensor:
    """Bool ``[N]``: candidates whose decoded text encodes back to the same ids."""
    keep = []
    for row, text in zip(candidates.tolist(), tokenizer.batch_decode(candidates.tolist())):
        keep.append(encode_text(tokenizer, text) == row)
    return torch.tensor(keep, dtype=torch.bool, device=candidates.device)


@dataclass
class GCGResult:
    """One attack: the best suffix (ids and text), its loss, the loss and suffix text of every step,
    whether the greedy answer matched the whole target (early stop), and the time taken."""

    suffix_ids: list[int]
    suffix: str
    loss: float
    initial_loss: float
    losses: list[float] = field(default_factory=list)
    suffixes: list[str] = field(default_factory=list)
    matched: bool = False
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)


def gcg_attack(model, tokenizer, prompt: str, target: str, config: GCGConfig = GCGConfig(), *,
               system: str | None = None, forbidden: torch.Tensor | None = None,
               progress: bool = True) -> GCGResult:
    """Optimise a suffix for ``prompt`` so that the model answers with ``target`` (see the module
    docstring). ``forbidden``: a precomputed :func:`forbidden_tokens` mask (it takes a pass over the
    vocabulary, so callers attacking many prompts compute it once)."""
    started = time.perf_counter()
    layout = suffix_layout(tokenizer, prompt, target, system=system)
    suffix = torch.tensor(encode_text(tokenizer, config.suffix_init), dtype=torch.long)
    vocab = model.get_input_embeddings().weight.shape[0]
    if forbidden is None:
        forbidden = forbidden_tokens(tokenizer, vocab, allow_non_ascii=config.allow_non_ascii,
                                     forbid_special=config.forbid_special)
    check_topk(config, forbidden)
    if config.n_replace > len(suffix):
        raise InputError(f"n_replace = {config.n_replace} exceeds the suffix's {len(suffix)} tokens")
    context = getattr(model.config, "max_position_embeddings", None)
    total = len(layout.before) + len(suffix) + len(layout.after) + len(layout.target)
    if context is not None and total > context:
        raise InputError(f"prompt + suffix + target has {total} tokens, more than the model's context of {context}")
    scorer = SuffixScorer(model, layout, prefix_cache=config.prefix_cache)
    device = scorer.device
    suffix = suffix.to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    initial_loss = float(scorer.losses(suffix[None])[0][0])
    losses, texts, ids, matched_at = [], [], [], None
    bar = tqdm(range(config.num_steps), desc="GCG", disable=not progress, leave=False)
    try:
        for _ in bar:
            top = top_tokens(scorer.gradient(suffix), forbidden, config.topk)
            with torch.no_grad():
                candidates = sample_candidates(suffix, top, config.search_width, config.n_replace, generator)
                if config.filter_ids:
                    candidates = candidates[retokenizes(tokenizer, candidates)]
                    if candidates.shape[0] == 0:
                        raise InputError("no candidate suffix tokenises back to itself; give another suffix_init "
                                         "(--suffix-init) or turn the filter off (--no-filter-ids)")
                loss, matched = scorer.losses(candidates, config.batch_size)
            best = int(loss.argmin())
            if config.early_stop and bool(matched.any()):
                best = int(torch.where(matched, loss, torch.full_like(loss, float("inf"))).argmin())
                matched_at = len(losses)
            suffix = candidates[best]
            losses.append(float(loss[best]))
            ids.append(suffix.tolist())
            texts.append(tokenizer.decode(ids[-1]))
            bar.set_postfix_str(f"loss={losses[-1]:.4f}")
            if matched_at is not None:
                break
    finally:
        bar.close()
    pick = matched_at if matched_at is not None else losses.index(min(losses))
    return GCGResult(ids[pick], texts[pick], losses[pick], initial_loss, losses, texts, matched_at is not None,
                     time.perf_counter() - started)


# Running GCG on benchmark targets -----------------------------------------------------------------

def target_string(target, default: str = DEFAULT_TARGET) -> str:
    """The string an optimisation attack aims the answer at for ``target``: AdvBench's own
    ``target`` column ("Sure, here is a script that …"), for the synthetic world the start of the
    item's compliant answer up to its colon ("sure . to make bomb :"), else ``default``."""
    if target.category == "advbench" and target.harmful_response:
        return target.harmful_response
    if target.category == "synthetic" and ":" in target.harmful_response:
        return target.harmful_response.split(":")[0] + ":"
    return default


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int, *,
                  perturbation: torch.Tensor | None = None, at: int = 0) -> str:
    """The model's greedy answer after the exact ``prompt_ids`` (up to the first end token). With
    ``perturbation`` ``[L, d]``, it is added to the input embeddings of positions ``at … at + L − 1``
    (the embedding attack's suffix) and the answer is decoded from the embeddings."""
    from deepalign.models.generation import end_token_ids

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and ids.shape[1] + max_new_tokens > context:
        raise InputError(f"the attacked prompt has {ids.shape[1]} tokens; with {max_new_tokens} new tokens it "
                         f"exceeds the model's context of {context}")
    ends = end_token_ids(tokenizer)
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                    eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
    if perturbation is None:
        generated = model.generate(ids, **settings)[0, ids.shape[1]:].tolist()
    else:
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[0, at:at + perturbation.shape[0]] += perturbation.to(embeds.dtype)
        generated = model.generate(inputs_embeds=embeds, **settings)[0].tolist()  # only the new tokens
    cut = next((i for i, t in enumerate(generated) if t in ends), len(generated))
    return tokenizer.decode(generated[:cut], skip_special_tokens=True)


def gcg_setting(config: GCGConfig) -> str:
    return f"gcg steps={config.num_steps} width={config.search_width} topk={config.topk}"


def run_gcg(model, tokenizer, targets, judge, log, config: GCGConfig = GCGConfig(), *,
            target_text: str | None = None, system: str | None = None, max_new_tokens: int = 256,
            progress: bool = True, tags: dict | None = None) -> list[dict]:
    """GCG on every target not yet in ``log`` (one record each, appended when its attack is done,
    so a rerun resumes with the next target): the suffix, the loss trajectory, the model's greedy
    answer to prompt + suffix and the judge's verdict on it. ``target_text`` replaces every
    target's own string (:func:`target_string`)."""
    from deepalign.attacks.generation_attacks import record_key

    key = {t.id: record_key(tags, f"{t.id}|gcg") for t in targets}
    todo = [t for t in targets if key[t.id] not in log]
    if not todo:
        return [r for r in log.records() if r["key"] in set(key.values())]
    vocab = model.get_input_embeddings().weight.shape[0]
    forbidden = forbidden_tokens(tokenizer, vocab, allow_non_ascii=config.allow_non_ascii,
                                 forbid_special=config.forbid_special)
    check_topk(config, forbidden)
    with tqdm(total=len(targets), initial=len(targets) - len(todo), desc="GCG targets", disable=not progress) as bar:
        for target in todo:
            _gcg_one(model, tokenizer, target, judge, log, config, key[target.id], forbidden, target_text=target_text,
                     system=system, max_new_tokens=max_new_tokens, progress=progress, tags=tags)
            bar.update(1)
    keys = set(key.values())
    return [r for r in log.records() if r["key"] in keys]


def _gcg_one(model, tokenizer, target, judge, log, config: GCGConfig, key: str, forbidden: torch.Tensor, *,
             target_text: str | None, system: str | None, max_new_tokens: int, progress: bool,
             tags: dict | None) -> None:
    """Attack one target, answer, judge and append its record."""
    goal = target_text if target_text is not None else target_string(target)
    result = gcg_attack(model, tokenizer, target.prompt, goal, config, system=system, forbidden=forbidden,
                        progress=progress)
    layout = suffix_layout(tokenizer, target.prompt, goal, system=system)
    output = greedy_answer(model, tokenizer, layout.prompt_ids(result.suffix_ids), max_new_tokens)
    log.append(attack_record(target, key, tags, "gcg", gcg_setting(config), goal, result, output, judge,
                             suffix=result.suffix, suffix_ids=result.suffix_ids))


def attack_record(target, key: str, tags: dict | None, attack: str, setting: str, goal: str, result, output: str,
                  judge, **fields) -> dict:
    """One optimisation attack's log record: the target's fields and tags, the attack and its
    setting, the loss trajectory of ``result`` (``loss``, ``initial_loss``, ``losses``, ``steps``,
    ``matched``, ``seconds``), the answer and the judge's verdict, with the attack's own ``fields``."""
    from deepalign.attacks.generation_attacks import target_fields

    return {"key": key, "id": target.id, "category": target.category, "prompt": target.prompt,
            **target_fields(target), **(tags or {}), "run": 0, "attack": attack, "setting": setting,
            "target_string": goal, **fields, "loss": round(result.loss, 6),
            "initial_loss": round(result.initial_loss, 6), "losses": [round(x, 6) for x in result.losses],
            "steps": result.steps, "target_matched": result.matched, "output": output, **judge(target, output),
            "seconds": round(result.seconds, 4)}
