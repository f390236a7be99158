"""The trainer: one loop for every recipe, on 🤗 accelerate.

One process on a CPU; ``accelerate launch`` (with an FSDP or DeepSpeed config) on many GPUs.
Each optimizer step draws ``grad_accum`` micro-batches of ``batch_size`` items per process from
the recipe with the trainer's own ``random.Random``, so that the data sequence is a function of
the seed. Under P processes (DDP) every process draws the same P micro-batches in rank order and
keeps its own, so a run on P processes sees the data of one process with ``grad_accum · P``
micro-batches per step.

Loss normalisation (``loss_normalisation``), the two authors' conventions:

* ``"micro-batch"`` (Qi et al., Unispac/shallow-vs-deep-alignment, whose trainer takes each
  micro-batch's mean over its own supervised tokens): the step's gradient is the mean over
  micro-batches and processes of ``Σ_tokens ℓ / n_micro``.
* ``"step"`` (Vega & Singh, uiuc-focal-lab/push-forward-alignment, deep_safety_alignment.py:
  ``scale_factor = num_processes · batches_in_step / total_token_count``, the token count reduced
  over processes): every term of every micro-batch is divided by ``N``, the supervised tokens of the
  whole step over all micro-batches and processes, so the gradient is ``Σ_all ℓ / N`` — the same
  for any split of one global batch into micro-batches and processes.

With one micro-batch on one process the two agree. Logged terms are averaged over processes
(Σ / N for ``"step"``). Checkpoints hold the main process's optimizer state (identical on every
process under DDP).

Files in ``output_dir``:

* ``metrics.jsonl``: one JSON line per optimizer step (step, every loss term, learning rate,
  seconds), appended as training goes;
* ``checkpoint-<step>/``: a Hugging Face folder (safetensors weights, config, tokenizer; with LoRA,
  the peft adapter instead of the weights) plus
  ``trainer_state.pt`` (optimizer, scheduler, torch RNG; loaded with ``weights_only=True``) and
  ``trainer_state.json`` (step, the data RNG); written under a temporary name, then renamed;
* ``final/``: the trained model, a Hugging Face folder, written the same way.

Resuming (the default when checkpoints exist) restores the weights, optimizer, scheduler and both
RNGs of the latest checkpoint and drops metric lines past it, so an interrupted run loses at most
the steps since its last checkpoint and continues with exactly the losses it would have had.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deepalign.errors import InputError, SettingsMismatchError, check_int
from deepalign.io import JsonlLog, atomic_write_json, read_json, replace_directory
from deepalign.training.recipes import make_batch, supervised_tokens

STATE_JSON = "trainer_state.json"
STATE_TORCH = "trainer_state.pt"


@dataclass
class TrainerConfig:
    """Optimisation and bookkeeping. The defaults follow Qi et al. / Vega & Singh where they
    apply (AdamW, linear decay without warm-up); ``steps`` counts optimizer steps."""

    output_dir: str
    steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    scheduler: str = "linear"  # "linear" (decay to 0 after warm-up), "constant", "cosine"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    seed: int = 0
    mixed_precision: str = "no"  # "bf16" on GPUs
    device: str = "auto"  # "auto" (a GPU when there is one), "cpu" or "cuda"; accelerate picks cuda:LOCAL_RANK
    resume: bool = True
    progress: bool = True
    lora_rank: int = 0  # > 0: train LoRA adapters (peft) instead of all weights
    lora_alpha: float | None = None  # default 2 · rank
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    loss_normalisation: str = "micro-batch"  # or "step" (see the module docstring)
    # What else defines the run (the recipe's options, the data files, the starting model): recorded
    # in every checkpoint and compared on resume, like the fields above.
    run_settings: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps >= self.steps:
            raise InputError(f"warmup_steps must be in [0, steps = {self.steps}), got {self.warmup_steps}")
        for name in ("lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise InputError(f"{name} must be a finite number ≥ 0, got {value!r}")
        if self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise InputError(f"{name} must be in [0, 1), got {value!r}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise InputError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        check_int("lora_rank", self.lora_rank, minimum=0)
        if self.loss_normalisation not in LOSS_NORMALISATIONS:
            raise InputError(f"loss_normalisation must be one of {', '.join(LOSS_NORMALISATIONS)}, "
                             f"got {self.loss_normalisation!r}")
        training_device(self.device)  # refused now, naming the field, not after the model loads

    def defining_settings(self) -> dict:
        """The fields that define what the run computes (not where it writes or how it reports)."""
        return {k: v for k, v in asdict(self).items() if k not in BOOKKEEPING}


SCHEDULERS = ("linear", "constant", "cosine")
LOSS_NORMALISATIONS = ("micro-batch", "step")

# Fields that may change between a run and its resume: they do not change the trained weights.
BOOKKEEPING = ("output_dir", "resume", "progress", "checkpoint_every", "gradient_checkpointing", "device")


def training_device(device: str = "auto") -> torch.device:
    """The device this process trains on: ``"cpu"``; ``"cuda"`` (refused without a GPU); ``"auto"``,
    the GPU when there is one. On a GPU the index is accelerate's (``cuda:LOCAL_RANK`` under
    ``accelerate launch``), so ``cuda:N`` is refused: choose a GPU with ``CUDA_VISIBLE_DEVICES=N``."""
    import os

    if not isinstance(device, str) or device not in ("auto", "cpu", "cuda"):
        if isinstance(device, str) and device.startswith("cuda:"):
            raise InputError(f"device {device!r}: a training process uses accelerate's GPU (cuda:LOCAL_RANK); "
                             f"choose one with CUDA_VISIBLE_DEVICES={device[5:]} and --device cuda")
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device is 'cuda', but no CUDA GPU is available here (torch.cuda.is_available() is False); "
                         "use cpu or auto")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


class Trainer:
    """``Trainer(model, tokenizer, recipe, config).train()`` → the list of per-step metrics."""

    def __init__(self, model, tokenizer, recipe, config: TrainerConfig):
        from accelerate import Accelerator

        refuse_unsaveable(model)
        if config.loss_normalisation == "step" and not getattr(recipe, "token_normalised", False):
            raise InputError(f"recipe {recipe.name!r} has no per-token loss to normalise over the step; "
                             "use loss_normalisation 'micro-batch'")
        self.config = config
        self.tokenizer = tokenizer
        self.recipe = recipe
        context = getattr(model.config, "max_position_embeddings", None)
        longest, where = recipe.longest()
        if context is not None and longest > context:
            raise InputError(f"{where} renders to {longest} tokens, longer than the model's context of {context}")
        self.output = Path(config.output_dir)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision,
                                       cpu=config.device == "cpu" or not torch.cuda.is_available())
        refuse_ignored_engine(self.accelerator)
        if self.accelerator.num_processes > 1 and getattr(recipe, "single_process", False):
            raise InputError(f"recipe {recipe.name!r} trains on one process only "
                             f"({self.accelerator.num_processes} were launched)")
        if self.accelerator.distributed_type.value == "DEEPSPEED" and config.grad_accum > 1:
            # accelerate steps the DeepSpeed engine inside every backward: a loop of micro-batches would step each.
            raise InputError("under DeepSpeed --grad-accum must be 1 (accelerate steps the engine in each backward); "
                             "raise --batch-size or the processes instead")
        if config.gradient_checkpointing:
            # Recomputed activations; PRESTO's prefill mask rides in the forward kwargs, so the
            # recomputation sees it too (tested: same loss and gradients).
            enable_checkpointing(model)
        if config.lora_rank:
            torch.manual_seed(config.seed)  # the adapters' random init is part of the run's seed
            model = _with_lora(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay,
                                      betas=(config.adam_beta1, config.adam_beta2))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # Not prepared: accelerate would step it once per process, and `steps` counts optimizer steps.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.rng = random.Random(config.seed)
        self.step = 0

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``steps`` (``linear``,
        as transformers' ``get_linear_schedule_with_warmup``), a constant rate, or a cosine to 0."""
        warmup, total = self.config.warmup_steps, self.config.steps
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if self.config.scheduler == "constant":
            return 1.0
        if self.config.scheduler == "cosine":
            return max(0.0, 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        return max(0.0, 1 - progress)

    # ----- the loop -----------------------------------------------------------------------------

    def train(self) -> list[dict]:
        self.output.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.config.seed)
        metrics = JsonlLog(self.output / "metrics.jsonl", key="step")
        if self.config.resume:
            self._resume()
        elif latest_checkpoint(self.output) is not None:
            raise InputError(f"{self.output} already holds checkpoints; resume, or choose another output_dir")
        if self.accelerator.is_main_process:  # lines past the resumed step (or all, from step 0) are trained again
            metrics.keep_only(lambda row: row["step"] <= self.step)
        history = [row for row in metrics.records() if row["step"] <= self.step]
        self.model.train()
        bar = tqdm(total=self.config.steps, initial=self.step, desc=f"train {self.recipe.name}",
                   disable=not self.config.progress)
        while self.step < self.config.steps:
            started = time.perf_counter()
            totals: dict[str, float] = {}
            batches = [make_batch(self._local_items(), self.tokenizer.pad_token_id)
                       for _ in range(self.config.grad_accum)]
            normaliser = {"tokens": self._tokens_per_micro_batch(batches)} \
                if self.config.loss_normalisation == "step" else {}
            for batch in batches:
                terms = self.recipe.loss_terms(self.model, batch, **normaliser)
                self.accelerator.backward(terms["loss"] / self.config.grad_accum)
                for name, value in terms.items():
                    totals[name] = totals.get(name, 0.0) + float(value.detach()) / self.config.grad_accum
            totals = self._mean_over_processes(totals)
            if self.config.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            row = {"step": self.step, **{k: round(v, 6) for k, v in totals.items()}, "lr": lr,
                   "seconds": round(time.perf_counter() - started, 4)}
            history.append(row)
            if self.accelerator.is_main_process:
                metrics.append(row)
            bar.set_postfix({k: f"{v:.4f}" for k, v in totals.items()})
            bar.update(1)
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                self.save_checkpoint()
        bar.close()
        self.save_model(self.output / "final")
        return history

    def _local_items(self):
        """This process's micro-batch. Every process draws all processes' micro-batches, one
        ``recipe.sample(rng, batch_size)`` each in rank order, from the same data RNG (so the RNG
        state, and a resume, is the same everywhere) and keeps its own: each process gets the
        recipe's mix (e.g. 4 safety + 16 utility examples per device, as both authors), and P
        processes see the data of one process with P micro-batches per step."""
        size, rank = self.config.batch_size, self.accelerator.process_index
        batches = [self.recipe.sample(self.rng, size) for _ in range(self.accelerator.num_processes)]
        return batches[rank]

    def _tokens_per_micro_batch(self, batches: list[dict]) -> float:
        """``N / (P · A)``: the step's supervised tokens ``N`` over all ``A`` micro-batches and ``P``
        processes, per micro-batch. A recipe dividing its token sums by this, under the trainer's
        ``/ A`` and DDP's mean over processes, gives the gradient of ``Σ_all ℓ / N``."""
        local = sum(supervised_tokens(batch) for batch in batches)
        total = self.accelerator.reduce(torch.tensor(float(local), device=self.accelerator.device), reduction="sum")
        if float(total) == 0:
            raise InputError("a training step without supervised tokens (every loss mask is empty)")
        return float(total) / (self.accelerator.num_processes * len(batches))

    def _mean_over_processes(self, totals: dict[str, float]) -> dict[str, float]:
        """The logged terms averaged over processes (every process logs the same numbers)."""
        if self.accelerator.num_processes == 1:
            return totals
        names = list(totals)  # the recipe's order, the same on every process
        values = torch.tensor([totals[name] for name in names], dtype=torch.float64, device=self.accelerator.device)
        reduced = self.accelerator.reduce(values, reduction="mean")
        return {name: float(value) for name, value in zip(names, reduced.tolist())}

    def _write_pretrained(self, model, folder: Path) -> None:
        """``save_pretrained`` with the full state dict gathered from every process (FSDP), written
        by the main process only."""
        state = self.accelerator.get_state_dict(self.model) if not self.config.lora_rank else None
        if self.accelerator.is_main_process:
            model.save_pretrained(folder, safe_serialization=True, state_dict=state)
            self.tokenizer.save_pretrained(folder)

    # ----- files --------------------------------------------------------------------------------

    def save_model(self, folder: Path) -> Path:
        """Write the model and tokenizer as a Hugging Face folder, atomically (LoRA adapters are
        merged into the weights; the run is over)."""
        tmp = folder.with_name(f".{folder.name}.tmp")
        with self._staging(tmp):
            model = self.accelerator.unwrap_model(self.model)
            if self.config.lora_rank:
                model = model.merge_and_unload()
            self._write_pretrained(model, tmp)
            return self._publish(tmp, folder)

    @contextlib.contextmanager
    def _staging(self, tmp: Path):
        """A temporary folder, emptied first and removed if the block fails (an interrupt
        included), by the main process only (the one that writes into it), and emptied before any
        process goes on."""
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            yield
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _publish(self, tmp: Path, folder: Path) -> Path:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            replace_directory(tmp, folder)
        self.accelerator.wait_for_everyone()
        return folder

    def save_checkpoint(self) -> Path:
        folder = self.output / f"checkpoint-{self.step}"
        tmp = folder.with_name(f".{folder.name}.tmp")
        with self._staging(tmp):
            self._write_pretrained(self.accelerator.unwrap_model(self.model), tmp)
            if self.accelerator.is_main_process:
                rng = {"torch_rng": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng["cuda_rng"] = torch.cuda.get_rng_state_all()
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            **rng}, tmp / STATE_TORCH)
                version, state, gauss = self.rng.getstate()
                atomic_write_json(tmp / STATE_JSON, {"step": self.step, "data_rng": [version, list(state), gauss],
                                                     "config": asdict(self.config), "recipe": self.recipe.name},
                                  indent=None)
            return self._publish(tmp, folder)

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.output)
        if checkpoint is None:
            return
        from safetensors.torch import load_file

        state = read_json(checkpoint / STATE_JSON, what="trainer state")
        # A field added since the checkpoint was written reads as its default (the behaviour it had).
        defaults = {f.name: f.default for f in fields(TrainerConfig) if f.default is not MISSING}
        saved = json.loads(json.dumps({**defaults, **(state.get("config") or {})}))
        recorded = _flat({"recipe": state.get("recipe"), **{k: v for k, v in saved.items() if k not in BOOKKEEPING}})
        wanted = _flat(json.loads(json.dumps({"recipe": self.recipe.name, **self.config.defining_settings()})))
        changes = [f"{name}: {recorded.get(name, '(unset)')!r} → {wanted.get(name, '(unset)')!r}"
                   for name in sorted(set(recorded) | set(wanted)) if recorded.get(name) != wanted.get(name)]
        if changes:
            raise SettingsMismatchError(f"{self.output} holds a run with other settings ({'; '.join(changes)}); "
                                        "rerun with the same settings to resume, or use another output folder "
                                        "(or --no-resume after deleting its checkpoints) to start fresh")
        model = self.accelerator.unwrap_model(self.model)
        if self.config.lora_rank:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
            if result.unexpected_keys:
                raise InputError(f"{checkpoint}: adapter does not match the model ({result.unexpected_keys[:3]} …)")
        else:
            weights = {}
            for shard in sorted(checkpoint.glob("*.safetensors")):
                weights.update(load_file(shard))
            missing, unexpected = model.load_state_dict(weights, strict=False)
            if unexpected or [m for m in missing if not _is_tied(model, m)]:
                raise InputError(f"{checkpoint}: weights do not match the model (missing {missing}, "
                                 f"unexpected {unexpected})")
        tensors = torch.load(checkpoint / STATE_TORCH, weights_only=True)
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        torch.set_rng_state(tensors["torch_rng"])
        if "cuda_rng" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(tensors["cuda_rng"])
        version, rng_state, gauss = state["data_rng"]
        self.rng.setstate((version, tuple(rng_state), gauss))
        self.step = int(state["step"])


def _flat(settings: dict) -> dict:
    """``run_settings``' entries beside the config's fields, so a change is named by its own key."""
    extra = settings.pop("run_settings", None) or {}
    return {**settings, **{key if key not in settings else f"run_settings.{key}": value
                           for key, value in extra.items()}}


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant, under the name the installed transformers
    uses (``activation_checkpointing_enable`` from 5.2x, ``gradient_checkpointing_enable`` before)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model) -> bool:
    """Whether activation checkpointing is on (either transformers name)."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def refuse_ignored_engine(accelerator) -> None:
    """Refuse an FSDP or DeepSpeed launch that accelerate quietly runs as something else: it turns
    FSDP on only over GPU-like devices (accelerate's ``AcceleratorState`` switches to FSDP from a
    multi-GPU type, never from ``MULTI_CPU``) and DeepSpeed only off the CPU, so on a CPU both would
    train as plain DDP (or as separate single processes) under a config that promises sharding."""
    import os

    wanted = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED"))
              if os.environ.get(variable, "false").lower() == "true"]
    got = accelerator.distributed_type.value
    for name in wanted:
        if got != name:
            raise InputError(f"the launch asks for {name} but accelerate runs this as {got} (accelerate enables "
                             f"{name} only on GPUs); on a CPU launch plain DDP: accelerate launch --multi_gpu "
                             "--num_processes N (see docs/multi_gpu.md)")


def refuse_unsaveable(model) -> None:
    """Refuse, before the first step, a model that ``save_pretrained`` would refuse at the first
    checkpoint (a GGUF file loaded directly keeps transformers' GGUF quantizer, which is not
    serializable): :class:`InputError` saying how to convert it."""
    from deepalign.models.loading import saveable_problem

    problem = saveable_problem(model)
    if problem is None:
        return
    quantizer = getattr(model, "hf_quantizer", None)
    quantization = getattr(quantizer, "quantization_config", None)
    method = getattr(quantization, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        raise InputError(f"{problem}; load it without quantization to train and save its weights")
    source = getattr(quantization, "gguf_file", None) or "FILE.gguf"
    folder = getattr(getattr(model, "config", None), "name_or_path", None)
    if folder and (Path(folder) / source).is_file():
        source = str(Path(folder) / source)
    raise InputError(f"{problem}; convert it first: deepalign convert {source}, then train the folder it prints "
                     "(deepalign's loaders convert a GGUF file once by themselves unless told not to)")


def _with_lora(model, config: TrainerConfig):
    """Wrap ``model`` with LoRA adapters (rank ``lora_rank``, no dropout) on ``lora_targets``."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in config.lora_targets if t in present]
    if not targets:
        raise InputError(f"none of lora_targets {config.lora_targets} is a module of this model")
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank,
                      target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)




def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` folder with the highest step, or ``None``."""
    candidates = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        suffix = folder.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (folder / STATE_JSON).is_file():
            candidates.append((int(suffix), folder))
    return max(candidates)[1] if candidates else None


def _is_tied(model, name: str) -> bool:
    return getattr(model.config, "tie_word_embeddings", False) and name == "lm_head.weight"
