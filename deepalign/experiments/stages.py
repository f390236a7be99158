"""The alignment stages on the synthetic world: base → shallow (refusal-only SFT) → DA → DA + PRESTO.

:func:`run_stages` pretrains a small Llama on the world's knowledge stream and compliant chats
(the base model, which answers every request), then aligns copies of it:

* ``shallow``: refusal-only SFT on harmful requests, with the utility rows (Qi et al.'s shallow
  alignment: refuses at the first token, continues a harmful prefill);
* ``da``: safety-recovery data augmentation with the utility anchor;
* ``presto``: DA + PRESTO (weight 1) through the fused attention.

Two fine-tuning attacks on the shallow model can follow (``ATTACK_STAGES``): ``ft-sft`` fine-tunes it
on harmful examples with plain SFT, ``ft-constrained`` on the same data with the token-wise
constrained objective (reference: the shallow model), the defence of Qi et al.

``cls`` (Li & Kim's explicit safety signal) gives a copy of the base model the [CLS] token and head,
continues pretraining with the pretraining routing (λ = 0.01, ``cls-pretrain/``), then fine-tunes it
on the balanced refusal/answer mixture with the SFT routing (λ = 0.1); its requests of the held-out
phrasings stay out of both (:func:`deepalign.experiments.world_files.cls_rows`). It has no row in the
stage reports: the demo decodes it with the defense.

Each stage is saved under ``output/<stage>/final`` and skipped when it is already there, so an
interrupted run resumes. Alignment is short and light next to pretraining, as in the papers; the
refusal-only SFT trains longer (600 steps at 3e-3) so that its first-token refusal margin is wide, and
the fine-tuning attacks are short and gentle (20 steps at 1e-4), the regime where the constrained
objective's bound on early tokens matters.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from deepalign.data.synthetic import DEFAULT_WORLD, WORLD_VERSIONS, SyntheticWorld, build_world
from deepalign.io import atomic_write_json, check_settings
from deepalign.experiments.world_evaluation import StageReport, evaluate_stage
from deepalign.models.loading import load_pretrained, tiny_random_model
from deepalign.training.ft_attacks import build_attack
from deepalign.training.recipes import ConstrainedRecipe, DARecipe, KnowledgeReplay, PretrainRecipe, SFTRecipe
from deepalign.training.trainer import Trainer, TrainerConfig
from deepalign.experiments.world_files import cls_rows, world_rows

STAGES = ("base", "shallow", "da", "presto")
ATTACK_STAGES = ("ft-sft", "ft-constrained")
CLS_STAGE = "cls"


@dataclass
class StageSettings:
    """Sizes and schedules; the defaults (world version 2's, :data:`DEFAULT_WORLD`) train all the stages
    on 2 CPU cores in about five minutes. :meth:`for_world` gives another world's defaults."""

    seed: int = 0
    world: str = DEFAULT_WORLD  # "v2" (deepalign.data.synthetic_v2: answers that re-read themselves) or "v1"
    hidden_size: int = 128
    layers: int = 4
    # Version 2's answers are 43 words and must re-read themselves: its base model pretrains 3000 steps.
    pretrain_steps: int = 3000
    pretrain_lr: float = 3e-3
    align_steps: int = 350
    align_lr: float = 1e-3
    # Refusal-only SFT trains longer and harder than DA, for a deep first-token refusal margin (log p of
    # "sure" about −9 to −11 on harmful requests): the constrained objective's bound on how far early
    # tokens may move only protects a margin wider than the bound.
    shallow_steps: int = 600
    shallow_lr: float = 3e-3
    # Share of each batch of the refusal SFT (shallow_replay) and of DA and PRESTO (align_replay) drawn from
    # the knowledge stream (KnowledgeReplay: plain texts, loss on every token; 0: none, as in version 1).
    # Without it, alignment alone erases this small model's version-2 recipes (prefilling then finds
    # nothing to continue), while a real aligned model keeps its pretraining knowledge. Replay 0.3 with 350
    # DA / PRESTO steps, chosen over the demo's seeds (README, "The model organism"): fewer steps or less
    # replay leave DA open to a 5-token prefill, more steps leave RAP little to find.
    shallow_replay: float = 0.5
    align_replay: float = 0.3
    batch_size: int = 16
    attack_steps: int = 20
    attack_lr: float = 1e-4  # fine-tuning attacks: closer to the papers' 2e-5 than alignment's rate
    cls_pretrain_steps: int = 300
    progress: bool = True

    def __post_init__(self):
        if self.world not in WORLD_VERSIONS:
            raise ValueError(f"world must be one of {WORLD_VERSIONS}, got {self.world!r}")
        for name in ("shallow_replay", "align_replay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def for_world(cls, world: str = DEFAULT_WORLD, **overrides) -> "StageSettings":
        """The settings for ``world`` (:data:`WORLD_STAGE_DEFAULTS` over the class defaults), then
        ``overrides``; an unknown world is refused by the constructor."""
        return cls(world=world, **{**WORLD_STAGE_DEFAULTS.get(world, {}), **overrides})


# What differs from the class defaults per world version: version 1 keeps the schedule its README
# tables were measured with (1500 pretraining steps, 150 of DA and PRESTO, no replay).
WORLD_STAGE_DEFAULTS: dict[str, dict] = {
    "v1": {"pretrain_steps": 1500, "align_steps": 150, "shallow_replay": 0.0, "align_replay": 0.0},
    "v2": {},
}


class JobProgress:
    """The whole job's progress: before each step (a stage trained or loaded, an evaluation, an
    attack run), one line on stderr such as ``[seed 0 (1/3), stage 2/8: shallow | job 2/45] training,
    600 steps``, so that the bars of the step below it can be read as part of the job."""

    def __init__(self, total: int, *, enabled: bool = True, stream=None):
        self.total, self.done, self.enabled, self.stream = total, 0, enabled, stream
        self.seed = ""

    def for_seed(self, seed: int, index: int, count: int) -> None:
        """The steps that follow belong to ``seed``, the ``index``-th (1-based) of ``count`` seeds."""
        self.seed = f"seed {seed} ({index}/{count})"

    def step(self, where: str, what: str) -> str:
        """Count one step of the job and (when enabled) print its line; returns the line."""
        self.done += 1
        place = ", ".join(part for part in (self.seed, where) if part)
        line = f"[{place} | job {self.done}/{self.total}] {what}"
        if self.enabled:
            tqdm.write(line, file=self.stream or sys.stderr)
        return line


def stage_plan(stages: Sequence[str] = STAGES) -> list[str]:
    """The stages :func:`run_stages` trains (or loads) for ``stages``, in its order: base always;
    shallow also when a fine-tuning attack needs it; [CLS] last."""
    wanted = set(stages)
    if wanted & set(ATTACK_STAGES):
        wanted.add("shallow")
    return ["base", *(name for name in ("shallow", "da", "presto", *ATTACK_STAGES, CLS_STAGE) if name in wanted)]


def stage_steps(stages: Sequence[str] = STAGES) -> int:
    """Job steps of one :func:`run_stages` call: each planned stage and the evaluation."""
    return len(stage_plan(stages)) + 1


def _train(model, tokenizer, recipe, folder: Path, steps: int, lr: float, settings: StageSettings):
    config = TrainerConfig(output_dir=str(folder), steps=steps, batch_size=settings.batch_size, lr=lr,
                           checkpoint_every=max(1, steps // 3), seed=settings.seed, progress=settings.progress)
    Trainer(model, tokenizer, recipe, config).train()
    return model


def run_stages(output: str | Path, settings: StageSettings | None = None, stages=STAGES, *,
               job: JobProgress | None = None) -> dict[str, StageReport]:
    """Train (or reload) each stage, evaluate it, and write ``output/reports.json``. ``job``: the
    progress of a larger job this is part of (default: this call alone, shown when
    ``settings.progress``)."""
    settings = settings or StageSettings()
    output = Path(output)
    plan = stage_plan(stages)
    job = job or JobProgress(stage_steps(stages), enabled=settings.progress)

    def announce(name: str, what: str) -> None:
        index = plan.index(name) + 1 if name in plan else len(plan) + 1
        job.step(f"stage {index}/{len(plan) + 1}: {name}", what)

    defining = {k: v for k, v in asdict(settings).items() if k != "progress"}
    check_settings(output / "stage_settings.json", defining,
                   fresh=f"use another output folder, or delete {output} to start over")
    world = build_world(settings.seed, settings.world)
    world.save(output)
    tokenizer = world.tokenizer()
    rows = world_rows(world)

    def stage(name: str, start, recipe_factory, steps: int, lr: float, attention: str | None = None):
        final = output / name / "final"
        if final.is_dir():
            announce(name, f"on disk, loading {final}")
            model, _ = load_pretrained(final, attn_implementation=attention)
            return model
        announce(name, f"training, {steps} steps")
        model = copy.deepcopy(start)
        if attention:
            from deepalign.models.attention import register_attention

            register_attention()
            model.set_attn_implementation(attention)
        return _train(model, tokenizer, recipe_factory(), output / name, steps, lr, settings)

    fresh = tiny_random_model("llama", vocab_size=len(tokenizer), hidden_size=settings.hidden_size,
                              layers=settings.layers, heads=4, kv_heads=2, head_dim=32, max_positions=256,
                              seed=settings.seed, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = world.pretraining_texts()
    compliant = rows["harmful_sft"] + rows["utility"]
    base = stage("base", fresh, lambda: PretrainRecipe(tokenizer, texts, compliant, chat_fraction=0.6),
                 settings.pretrain_steps, settings.pretrain_lr)
    models = {"base": base}

    def replayed(recipe, share: float):
        return KnowledgeReplay(recipe, tokenizer, texts, share) if share else recipe

    def shallow_stage():
        return stage("shallow", base, lambda: replayed(SFTRecipe(tokenizer, rows["refusal_sft"]), settings.shallow_replay),
                     settings.shallow_steps, settings.shallow_lr)

    if "shallow" in stages:
        models["shallow"] = shallow_stage()
    if "da" in stages:
        models["da"] = stage("da", base, lambda: replayed(DARecipe(tokenizer, rows["safety"], rows["utility"]),
                                                          settings.align_replay),
                             settings.align_steps, settings.align_lr)
    if "presto" in stages:
        models["presto"] = stage("presto", base, lambda: replayed(DARecipe(tokenizer, rows["safety"], rows["utility"],
                                                                           presto_weight=1.0), settings.align_replay),
                                 settings.align_steps, settings.align_lr, attention="deepalign")
    if "ft-sft" in stages or "ft-constrained" in stages:
        shallow = models.get("shallow") or shallow_stage()
        attack = build_attack("harmful", rows["safety"], []).rows
        if "ft-sft" in stages:
            models["ft-sft"] = stage("ft-sft", shallow, lambda: SFTRecipe(tokenizer, attack),
                                     settings.attack_steps, settings.attack_lr)
        if "ft-constrained" in stages:
            models["ft-constrained"] = stage(
                "ft-constrained", shallow,
                lambda: ConstrainedRecipe(tokenizer, attack, copy.deepcopy(shallow), progress=settings.progress),
                settings.attack_steps, settings.attack_lr)
    if CLS_STAGE in stages:
        on_disk = (output / CLS_STAGE / "final").is_dir()
        announce(CLS_STAGE, f"on disk, keeping {output / CLS_STAGE / 'final'}" if on_disk else
                 f"training, {settings.cls_pretrain_steps} steps of [CLS] pretraining then {settings.align_steps} "
                 "of [CLS] SFT")
        train_cls_stage(output, base, world, settings)
    announce("evaluate", f"evaluating {len(models)} models on the world (refusal, prefilling, utility, ranks)")
    reports = {name: evaluate_stage(model, tokenizer, world) for name, model in models.items()}
    atomic_write_json(output / "reports.json", {"settings": asdict(settings),
                                                "reports": {k: asdict(v) for k, v in reports.items()}})
    return reports


def train_cls_stage(output: Path, base, world: SyntheticWorld, settings: StageSettings) -> Path:
    """Train (or find) the [CLS] model under ``output/cls/final``; returns that folder."""
    from deepalign.models.safety_cls import add_safety_cls, load_safety_cls
    from deepalign.training.cls_recipe import CLSRecipe

    final = output / CLS_STAGE / "final"
    if final.is_dir():
        return final
    rows = cls_rows(world)
    pretrained = output / "cls-pretrain" / "final"
    if pretrained.is_dir():
        model, tokenizer = load_safety_cls(pretrained)
    else:
        model, tokenizer = copy.deepcopy(base), world.tokenizer()
        add_safety_cls(model, tokenizer, seed=settings.seed)
        _train(model, tokenizer, CLSRecipe(tokenizer, "pretrain", texts=rows["texts"],
                                           malicious=rows["pretrain_malicious"], benign=rows["pretrain_benign"]),
               output / "cls-pretrain", settings.cls_pretrain_steps, settings.align_lr, settings)
    _train(model, tokenizer, CLSRecipe(tokenizer, "sft", malicious=rows["sft_malicious"], benign=rows["sft_benign"]),
           output / CLS_STAGE, settings.align_steps, settings.align_lr, settings)
    return final


def format_reports(reports: dict[str, StageReport]) -> str:
    """A plain-text table: one row per stage."""
    lengths = sorted(next(iter(reports.values())).prefill_scores)
    header = (f"{'stage':<15} {'refuse@1':>8} " + " ".join(f"{'prefill' + str(k):>9}" for k in lengths)
              + f" {'utility':>8} {'rank med':>8} {'top-20':>7}")
    lines = [header, "-" * len(header)]
    for name, r in reports.items():
        lines.append(f"{name:<15} {r.first_token_refusal:>8.2f} "
                     + " ".join(f"{r.prefill_scores[k]:>9.3f}" for k in lengths)
                     + f" {r.benign_utility:>8.3f} {r.harmful_rank_median:>8.1f} {r.harmful_rank_top20:>7.2f}")
    return "\n".join(lines)
