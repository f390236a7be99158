"""The embedding attack: projected gradient descent on the input embeddings of a suffix, within an
L2 ball around them, toward a target string (white-box access to embeddings; it measures how deep
a defense is when the attacker need not produce real tokens).

The layout is GCG's (:func:`deepalign.attacks.gcg.suffix_layout`): the user's words, a suffix
(``suffix_init``'s tokens, nanoGCG's 20 × ``x`` by default), the end of the user's turn and the
assistant header, then the target. The update is that of Vega & Singh's ``embedding_attack``
(``utils.py`` of uiuc-focal-lab/push-forward-alignment), on the suffix's positions:

* perturbation δ ``[L, d]`` starts at zero; each step computes the target loss (mean cross-entropy
  of the target tokens) at ``embeddings + δ``, keeps the δ of the lowest loss seen, and steps
  ``δ ← δ − step_size · sign(∇δ loss)``;
* each position's δ is projected onto the L2 ball of radius ``epsilon × mean L2 norm of the
  embedding table's rows`` (``‖δ_t‖ ≤ r`` for every suffix token t);
* after the last step the final δ is scored too, and the best δ is returned.

With ``early_stop`` the attack ends at the first step whose greedy prediction equals the whole target
(as Schwinn et al.'s ``embedding_attack_toxic.py`` does). The prompt prefix before the suffix is run
once and cached, as in GCG.

Defaults: the release fixes the update and the radius's unit but no budget (its function takes
``steps``, ``step_size`` and ``epsilon`` as required arguments and no script of the release calls
it). 100 steps and a signed step of 0.01 are Schwinn et al.'s (``num_steps=100``, ``step_size=0.01``
in ``embedding_attack_toxic.py``, SchwinnL/LLM_Embedding_Attack), whose update Vega & Singh's
follows; ``epsilon = 1`` (a ball as large as an average token embedding) is deepalign's choice, since
Schwinn et al.'s attack has no ball.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from deepalign.attacks.gcg import DEFAULT_SUFFIX, SuffixScorer, attack_record, greedy_answer, suffix_layout, target_string
from deepalign.errors import InputError
from deepalign.models.chat import encode_text


@dataclass(frozen=True)
class EmbeddingConfig:
    """``steps`` PGD steps of signed size ``step_size`` (embedding units), ball radius ``epsilon``
    × the mean row norm of the embedding table, the suffix's initial text, early stop on an exact
    greedy match of the target (defaults and their sources: the module docstring)."""

    steps: int = 100
    step_size: float = 0.01
    epsilon: float = 1.0
    suffix_init: str = DEFAULT_SUFFIX
    early_stop: bool = True
    prefix_cache: bool = True

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise InputError(f"steps must be a positive int, got {self.steps!r}")
        for name in ("step_size", "epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise InputError(f"{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.suffix_init, str) or not self.suffix_init.strip():
            raise InputError(f"suffix_init must be a non-empty string, got {self.suffix_init!r}")


@dataclass
class EmbeddingResult:
    """One attack: the best perturbation ``[L, d]`` of the suffix's embeddings, its loss, the loss of
    every step, the ball's radius and the largest per-token perturbation norm, whether the greedy
    prediction matched the whole target, and the time taken."""

    suffix_ids: list[int]
    perturbation: torch.Tensor
    loss: float
    initial_loss: float
    radius: float
    max_norm: float
    losses: list[float] = field(default_factory=list)
    matched: bool = False
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)


def ball_radius(model, epsilon: float) -> float:
    """``epsilon`` × the mean L2 norm of the rows of the model's input embedding table."""
    weight = model.get_input_embeddings().weight.detach()
    return float(epsilon * weight.float().norm(dim=-1).mean())


def project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row of ``delta`` (one position) scaled onto the L2 ball of ``radius`` when outside it."""
    norm = delta.norm(dim=-1, keepdim=True)
    return torch.where(norm > radius, delta / norm.clamp_min(1e-30) * radius, delta)


def embedding_attack(model, tokenizer, prompt: str, target: str, config: EmbeddingConfig = EmbeddingConfig(), *,
                     system: str | None = None, progress: bool = True) -> EmbeddingResult:
    """PGD on the suffix embeddings of ``prompt`` toward ``target`` (see the module docstring)."""
    started = time.perf_counter()
    layout = suffix_layout(tokenizer, prompt, target, system=system)
    suffix_ids = encode_text(tokenizer, config.suffix_init)
    context = getattr(model.config, "max_position_embeddings", None)
    total = len(layout.before) + len(suffix_ids) + len(layout.after) + len(layout.target)
    if context is not None and total > context:
        raise InputError(f"prompt + suffix + target has {total} tokens, more than the model's context of {context}")
    scorer = SuffixScorer(model, layout, prefix_cache=config.prefix_cache)
    radius = ball_radius(model, config.epsilon)
    with torch.no_grad():
        base = scorer.embedding(torch.tensor([suffix_ids], dtype=torch.long, device=scorer.device))
    delta = torch.zeros_like(base)
    best_delta, best_loss, initial_loss, matched = delta.clone(), math.inf, None, False
    losses = []
    bar = tqdm(range(config.steps), desc="embedding attack", disable=not progress, leave=False)
    try:
        for _ in bar:
            delta.requires_grad_(True)
            loss, hit = scorer.embeds_loss(base + delta)
            value = float(loss.detach())
            initial_loss = value if initial_loss is None else initial_loss
            losses.append(value)
            if value < best_loss:
                best_loss, best_delta = value, delta.detach().clone()
            bar.set_postfix_str(f"loss={value:.4f}")
            if config.early_stop and bool(hit):
                best_loss, best_delta, matched = value, delta.detach().clone(), True
                break
            (grad,) = torch.autograd.grad(loss, [delta])
            with torch.no_grad():
                delta = project(delta.detach() - config.step_size * grad.sign(), radius)
    finally:
        bar.close()
    if not matched:  # the last step's perturbation is scored too
        with torch.no_grad():
            loss, _ = scorer.embeds_loss(base + delta)
            if float(loss) < best_loss:
                best_loss, best_delta = float(loss), delta.detach().clone()
            matched = bool(scorer.embeds_loss(base + best_delta)[1])
    best_delta = best_delta[0]
    return EmbeddingResult(suffix_ids, best_delta, best_loss, initial_loss, radius,
                           float(best_delta.float().norm(dim=-1).max()), losses, matched,
                           time.perf_counter() - started)


def greedy_answer_embedded(model, tokenizer, layout, suffix_ids: Sequence[int], perturbation: torch.Tensor,
                           max_new_tokens: int) -> str:
    """The model's greedy answer to the prompt whose suffix embeddings carry ``perturbation``."""
    return greedy_answer(model, tokenizer, layout.prompt_ids(suffix_ids), max_new_tokens, perturbation=perturbation,
                         at=len(layout.before))


def embedding_setting(config: EmbeddingConfig) -> str:
    return f"embedding steps={config.steps} step={config.step_size:g} eps={config.epsilon:g}"


def run_embedding(model, tokenizer, targets, judge, log, config: EmbeddingConfig = EmbeddingConfig(), *,
                  target_text: str | None = None, system: str | None = None, max_new_tokens: int = 256,
                  progress: bool = True, tags: dict | None = None) -> list[dict]:
    """The embedding attack on every target not yet in ``log`` (one record each): loss trajectory,
    radius and largest perturbation norm, the greedy answer with the perturbed suffix and the
    judge's verdict. The perturbation itself is not logged (``[L, d]`` floats)."""
    from deepalign.attacks.generation_attacks import record_key

    key = {t.id: record_key(tags, f"{t.id}|embedding") for t in targets}
    todo = [t for t in targets if key[t.id] not in log]
    with tqdm(total=len(targets), initial=len(targets) - len(todo), desc="embedding attack targets",
              disable=not progress) as bar:
        for target in todo:
            goal = target_text if target_text is not None else target_string(target)
            result = embedding_attack(model, tokenizer, target.prompt, goal, config, system=system, progress=progress)
            layout = suffix_layout(tokenizer, target.prompt, goal, system=system)
            output = greedy_answer_embedded(model, tokenizer, layout, result.suffix_ids, result.perturbation,
                                            max_new_tokens)
            log.append(attack_record(target, key[target.id], tags, "embedding", embedding_setting(config), goal,
                                     result, output, judge, suffix_init=tokenizer.decode(result.suffix_ids),
                                     radius=round(result.radius, 6), max_norm=round(result.max_norm, 6)))
            bar.update(1)
    keys = set(key.values())
    return [r for r in log.records() if r["key"] in keys]
