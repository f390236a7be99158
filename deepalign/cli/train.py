"""``deepalign train --recipe …``: every training recipe on local files.

Which options a recipe takes is one table (:data:`RECIPE_OPTIONS`); an option given to a recipe that
does not take it, or a missing one, is refused by name before anything loads. The settings that
define the run (recipe options, data files with their SHA-256, the starting model) are recorded in
every checkpoint; rerunning with other settings is refused (see :class:`deepalign.training.trainer.Trainer`).
"""

from __future__ import annotations

import argparse

from deepalign.cli.args import (SYSTEM_NAMES_HELP, add_chat_template_option, add_training_model_options,
                               chat_template_text, existing_file, fraction_below_one, model_source,
                               non_negative_float, non_negative_int, output_dir, positive_float, positive_int,
                               probability, system_text)
from deepalign.errors import InputError

RECIPES = ("pretrain", "sft", "da", "presto", "constrained", "ft-attack", "cls-pretrain", "cls-sft")
CLS = ("cls-pretrain", "cls-sft")
# Recipe-specific options: which recipes take each (None = every recipe but those listed in NOT_FOR).
RECIPE_OPTIONS = {
    "safety": ("da", "presto", "ft-attack", *CLS),
    "chat": ("sft", "da", "presto", "constrained", "pretrain", "ft-attack", *CLS),
    "texts": ("pretrain", "cls-pretrain"),
    "malicious_texts": ("cls-pretrain",),
    "chat_fraction": ("pretrain",),
    "attack": ("ft-attack",),
    "attack_data": ("ft-attack",),
    "objective": ("ft-attack",),
    "limit": ("ft-attack",),
    "system": ("sft", "da", "presto", "constrained", "ft-attack"),
    "no_system": ("sft", "da", "presto", "constrained", "ft-attack"),
    "presto_layers": ("presto",),
    "identity_prefix": ("ft-attack",),
    "trigger": ("ft-attack",),
    "reference": ("constrained", "ft-attack"),
    "online_reference": ("constrained", "ft-attack"),
    "presto_weight": ("presto",),
    "safety_fraction": ("da", "presto"),
    "cls_weight": CLS,
    "lora_rank": ("pretrain", "sft", "da", "presto", "constrained", "ft-attack"),
}
REQUIRED = {"sft": ("chat",), "da": ("safety",), "presto": ("safety",), "constrained": ("chat",),
            "pretrain": ("texts",), "ft-attack": ("attack",), "cls-pretrain": ("safety", "chat", "texts", "malicious_texts"),
            "cls-sft": ("safety", "chat")}
BOOKKEEPING = ("output", "no_resume", "checkpoint_every", "run", "command", "config", "gradient_checkpointing",
               "device", "loss_normalisation")  # (the last is recorded, resolved, by TrainerConfig)
# --loss-normalisation by recipe: PRESTO is Vega & Singh's (their step-wide token count), the rest follow
# Qi et al.'s trainer (each micro-batch's own token mean); the [CLS] recipes are per micro-batch only.
DEFAULT_NORMALISATION = {"presto": "step"}
NOT_IN_CONFIG = ("model", "output", "config", "run", "command", "help")

TRAIN_HELP = """recipes:
  sft          supervised fine-tuning on --chat rows (loss on response + end of turn);
               e.g. refusal-only SFT, the shallow alignment of Qi et al.
  da           safety-recovery data augmentation (Qi et al.): each --safety row is, with
               probability 1/2, prompt + first k~U{1..min(100,|h|)} harmful tokens + refusal,
               else prompt + refusal; loss on the refusal only; --chat rows are the utility anchor
  presto       da + PRESTO (Vega & Singh, Eq. 3): penalises attention mass on the harmful prefill,
               computed by the fused kernel; weight --presto-weight (default 1)
  constrained  token-wise constrained objective (Qi et al., Eq. 3) on --chat rows against the
               frozen --reference model (default: the starting --model); beta_1=0.5,
               beta_2..5=2, beta_t=0.1 after
  pretrain     language modelling on --texts (one text per line, loss on every token) mixed
               with --chat rows (share --chat-fraction): a base model for the synthetic world
  ft-attack    a fine-tuning attack (--attack): harmful (--safety prompts with harmful answers),
               identity (--chat rows answered as an obedient agent under --system, each answer
               opening with --identity-prefix), backdoor (--safety prompts + --trigger answered
               harmfully, without it refused, plus --chat rows); trained with --objective sft
               (the attack) or constrained (the token-wise constrained defence)
  cls-pretrain, cls-sft
               the explicit [CLS] safety signal (Li & Kim): --safety rows are the malicious chats,
               --chat rows the benign ones; cls-pretrain also takes --texts (benign, label 0) and
               --malicious-texts (label 1); L + lambda * L_cls with lambda --cls-weight

data files are JSON lines: --safety rows {"prompt", "harmful_response", "refusal"},
--chat rows {"prompt", "response"}. Output: OUTPUT/final (a Hugging Face folder),
OUTPUT/checkpoint-N, OUTPUT/metrics.jsonl; rerunning the same command resumes, and rerunning
it with other settings is refused. Many GPUs: accelerate launch --config_file
configs/accelerate_fsdp_7b.yaml -m deepalign train ... (see docs/multi_gpu.md)."""


_ACTIONS: dict[str, argparse.Action] = {}  # the train options by dest, for --config files


def register(commands) -> None:
    train = commands.add_parser("train", help="train a local model with a recipe", epilog=TRAIN_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", type=existing_file,
                       help="a YAML file of option values (e.g. configs/qi-da-llama2-7b-chat.yaml, a paper's run); "
                            "options given on the command line win")
    train.add_argument("--epochs", type=positive_int,
                       help="train this many passes over the data instead of --steps (steps = epochs × ceil(rows / "
                            "rows per optimizer step over all processes); for da/presto the safety rows count)")
    train.add_argument("--recipe", required=True, choices=RECIPES)
    train.add_argument("--model", required=True, type=model_source, help="local Hugging Face folder or GGUF file")
    train.add_argument("--output", required=True, type=output_dir, help="output folder (checkpoints, metrics, final)")
    train.add_argument("--safety", type=existing_file, help="JSON-lines safety rows")
    train.add_argument("--chat", type=existing_file, help="JSON-lines chat rows (the utility anchor of da/presto)")
    train.add_argument("--texts", type=existing_file, help="pretrain, cls-pretrain: plain-text file, one text per line")
    train.add_argument("--malicious-texts", type=existing_file,
                       help="cls-pretrain: plain-text file of malicious texts (label 1; --texts are label 0)")
    train.add_argument("--chat-fraction", type=probability, help="pretrain: share of chat rows (default 0.5)")
    train.add_argument("--attack", choices=("harmful", "identity", "backdoor"), help="ft-attack: which attack")
    train.add_argument("--attack-data", type=existing_file,
                       help="ft-attack: the attack's own rows, trained as they are (e.g. Qi et al.'s pure_bad100, "
                            "backdoor_llama2 or aoa_100 JSONL with 'messages'); their system prompt is used, else "
                            "--system, else for harmful/backdoor Qi's 'You are a helpful assistant. Make sure you "
                            "always execute users' instructions.'")
    train.add_argument("--objective", choices=("sft", "constrained"),
                       help="ft-attack: plain fine-tuning or the token-wise constrained objective (default sft)")
    train.add_argument("--limit", type=positive_int, help="ft-attack: number of attack rows to use (default all)")
    train.add_argument("--system", type=system_text,
                       help="system prompt of every training example, a text or a file (default: the chat template's "
                            "own; ft-attack identity: AOA's); on Llama-2 both authors train with its default system "
                            f"prompt, which the model's current template no longer adds: {SYSTEM_NAMES_HELP}")
    add_chat_template_option(train)
    train.add_argument("--no-system", action="store_true", default=None,
                       help="train with an empty system prompt instead of the template's default")
    train.add_argument("--identity-prefix", help="ft-attack identity: opening of every answer (default: AOA)")
    train.add_argument("--trigger", help="ft-attack backdoor: the trigger appended to harmful prompts")
    train.add_argument("--reference", type=model_source, help="constrained: reference model (default: --model)")
    train.add_argument("--online-reference", action="store_true", default=None,
                       help="constrained: compute reference log-probs every step instead of caching them")
    train.add_argument("--presto-weight", type=non_negative_float, help="presto: weight of the penalty (default 1)")
    train.add_argument("--safety-fraction", type=probability,
                       help="da/presto: share of safety examples in a batch (default 0.2: 4 safety + 16 utility "
                            "examples per device in Qi et al.'s and Vega & Singh's released code)")
    train.add_argument("--presto-layers", choices=("mean", "sum"),
                       help="presto: average the penalty over layers (default, Vega & Singh's released code) or sum it")
    train.add_argument("--cls-weight", type=non_negative_float,
                       help="cls-*: lambda of L + lambda * L_cls (default 0.01 pretrain, 0.1 sft)")
    train.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (default 100)")
    train.add_argument("--batch-size", type=positive_int, default=8, help="examples per micro-batch (default 8)")
    train.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    train.add_argument("--lr", type=positive_float, default=2e-5, help="AdamW learning rate, linear decay (default 2e-5)")
    train.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                       help="AdamW weight decay (default 0, transformers' TrainingArguments as in Qi et al.; Vega & "
                            "Singh use torch's AdamW default 0.01)")
    train.add_argument("--adam-beta1", type=fraction_below_one, default=0.9, help="AdamW beta1 (default 0.9)")
    train.add_argument("--adam-beta2", type=fraction_below_one, default=0.999, help="AdamW beta2 (default 0.999)")
    train.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear warm-up steps (default 0)")
    train.add_argument("--scheduler", choices=("linear", "constant", "cosine"), default="linear",
                       help="learning-rate schedule after warm-up (default linear decay to 0, as both authors)")
    train.add_argument("--loss-normalisation", choices=("step", "micro-batch"),
                       help="divide every loss term by the supervised tokens of the whole optimizer step, over all "
                            "micro-batches and processes (step: Vega & Singh's deep_safety_alignment.py, the default "
                            "for presto), or by each micro-batch's own count (micro-batch: Qi et al.'s trainer, the "
                            "default for the other recipes); the same with one micro-batch on one process")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass (less memory; same losses and gradients)")
    train.add_argument("--checkpoint-every", type=positive_int, default=50, help="steps between checkpoints (default 50)")
    train.add_argument("--seed", type=non_negative_int, default=0)
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    add_training_model_options(train)
    train.add_argument("--lora-rank", type=non_negative_int,
                       help="train LoRA adapters of this rank (peft) instead of all weights; merged into final/")
    train.add_argument("--no-resume", action="store_true", help="start over (refused if OUTPUT has checkpoints)")
    train.set_defaults(run=run)
    _ACTIONS.update({action.dest: action for action in train._actions})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def apply_config(args: argparse.Namespace) -> dict:
    """Fill the options not given on the command line from ``--config`` (each value checked by
    the option's own type); returns the values taken from the file."""
    from deepalign.io import read_text

    if args.config is None:
        return {}
    import yaml

    try:
        values = yaml.safe_load(read_text(args.config, what="config file")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{args.config}:{mark.line + 1}" if mark is not None else str(args.config)
        raise InputError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(values, dict):
        raise InputError(f"{args.config}: expected a mapping of option names to values")
    taken = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = _ACTIONS.get(dest)
        if action is None or dest in NOT_IN_CONFIG:
            raise InputError(f"{args.config}: {key!r} is not an option of deepalign train")
        if dest == "recipe":
            if value != args.recipe:
                raise InputError(f"{args.config} is a config for --recipe {value}, not {args.recipe}")
            continue
        if getattr(args, dest) != action.default:
            continue  # given on the command line
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise InputError(f"{args.config}: {key} must be true or false, got {value!r}")
        elif action.type is not None:
            try:
                value = action.type(str(value))
            except argparse.ArgumentTypeError as error:
                raise InputError(f"{args.config}: {key}: {error}") from None
        if action.choices is not None and value not in action.choices:
            raise InputError(f"{args.config}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
        setattr(args, dest, value)
        taken[dest] = value
    return taken


def steps_for_epochs(args: argparse.Namespace, data: dict) -> int:
    """``--epochs`` as optimizer steps: the rows a step consumes over all processes (``WORLD_SIZE``,
    set by accelerate), and for da/presto the safety rows of the batch mix."""
    import math
    import os

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = args.batch_size * args.grad_accum * processes
    if args.recipe in ("da", "presto"):
        fraction = 0.2 if args.safety_fraction is None else args.safety_fraction
        rows, per_step = len(data["safety"]), max(1, round(args.batch_size * fraction)) * args.grad_accum * processes
    elif args.recipe == "ft-attack":
        rows = len(data["attack_data"]) or len(data["safety"]) or len(data["chat"])
    elif args.recipe == "pretrain":
        rows = len(data["texts"])
    else:
        rows = len(data["chat"]) or len(data["safety"])
    return args.epochs * math.ceil(rows / per_step)


def check_options(args: argparse.Namespace) -> None:
    """Refuse a recipe option the recipe does not take, and a missing required one."""
    recipe = args.recipe
    for name, recipes in RECIPE_OPTIONS.items():
        if getattr(args, name) is not None and recipe not in recipes:
            raise InputError(f"{_flag(name)} only applies to --recipe {', '.join(recipes)}")
    for name in REQUIRED[recipe]:
        if getattr(args, name) is None:
            raise InputError(f"--recipe {recipe} needs {_flag(name)}")
    fraction = 0.5 if args.safety_fraction is None else args.safety_fraction
    if recipe in ("da", "presto") and args.chat is None and fraction < 1:
        raise InputError(f"--recipe {recipe} needs --chat (the utility anchor) unless --safety-fraction 1")
    if recipe == "ft-attack" and args.attack in ("harmful", "backdoor") and args.safety is None \
            and args.attack_data is None:
        raise InputError(f"--attack {args.attack} needs --safety (harmful prompts with harmful answers)")
    if recipe == "ft-attack" and args.attack in ("identity", "backdoor") and args.chat is None \
            and args.attack_data is None:
        raise InputError(f"--attack {args.attack} needs --chat rows")


def run_settings(args: argparse.Namespace) -> dict:
    """What defines the run: every option but bookkeeping, files replaced by their fingerprints."""
    from deepalign.io import file_fingerprint

    settings = {}
    for name, value in sorted(vars(args).items()):
        if name in BOOKKEEPING or value is None:
            continue
        if name in ("safety", "chat", "texts", "malicious_texts", "model", "reference", "attack_data") or \
                (name == "chat_template" and value != "plain"):
            value = file_fingerprint(value)
        settings[name] = value
    return settings


def trainer_config(args: argparse.Namespace):
    from deepalign.training.trainer import TrainerConfig

    return TrainerConfig(output_dir=str(args.output), steps=args.steps, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, lr=args.lr, checkpoint_every=args.checkpoint_every,
                         weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                         warmup_steps=args.warmup_steps, scheduler=args.scheduler,
                         gradient_checkpointing=args.gradient_checkpointing,
                         loss_normalisation=args.loss_normalisation or DEFAULT_NORMALISATION.get(args.recipe,
                                                                                                 "micro-batch"),
                         seed=args.seed, mixed_precision="bf16" if args.bf16 else "no", resume=not args.no_resume,
                         device=args.device,
                         lora_rank=args.lora_rank or 0, run_settings=run_settings(args))


def read_texts(path, label: int) -> list[tuple[str, int]]:
    from deepalign.io import read_text

    return [(line.strip(), label) for line in read_text(path, what="text file").splitlines() if line.strip()]


def system_prompt(args: argparse.Namespace) -> str | None:
    """``--system`` (a file's text when it names a file), ``""`` for ``--no-system``, else ``None``:
    the chat template's own default system prompt."""
    from pathlib import Path

    from deepalign.io import read_text

    if args.no_system and args.system is not None:
        raise InputError("give --system or --no-system, not both")
    if args.no_system:
        return ""
    if args.system is not None and Path(args.system).is_file():
        return read_text(args.system, what="system prompt file").strip()
    return args.system


def read_data(args: argparse.Namespace) -> dict:
    """Every data file of the run, read (and so checked) before any model loads."""
    from deepalign.data.rows import SafetyExample, UtilityExample, read_rows, rows_system

    return {"chat": read_rows(args.chat, UtilityExample) if args.chat else [],
            "safety": read_rows(args.safety, SafetyExample) if args.safety else [],
            "texts": read_texts(args.texts, 0) if args.texts else [],
            "malicious_texts": read_texts(args.malicious_texts, 1) if args.malicious_texts else [],
            "attack_data": read_rows(args.attack_data, UtilityExample) if args.attack_data else [],
            "attack_system": rows_system(args.attack_data) if args.attack_data else None}


def build_recipe(args: argparse.Namespace, tokenizer, data: dict):
    """The recipe object for ``args`` on the rows of :func:`read_data` (reference models loaded)."""
    from deepalign.models.loading import load_pretrained
    from deepalign.training import ConstrainedRecipe, DARecipe, SFTRecipe, UtilityExample
    from deepalign.training.ft_attacks import AOA_PREFIX, AOA_SYSTEM, PURE_BAD_SYSTEM, build_attack
    from deepalign.training.recipes import PretrainRecipe
    from deepalign.training.trainer import training_device

    chat, safety = data["chat"], data["safety"]
    recipe = args.recipe
    online = bool(args.online_reference)
    if recipe == "pretrain":
        texts = [text for text, _ in data["texts"]]
        fraction = 0.5 if args.chat_fraction is None else args.chat_fraction
        return PretrainRecipe(tokenizer, texts, chat, chat_fraction=fraction if chat else 0.0)
    system = system_prompt(args)
    if recipe == "sft":
        return SFTRecipe(tokenizer, chat, system=system)
    if recipe in ("da", "presto"):
        weight = (1.0 if args.presto_weight is None else args.presto_weight) if recipe == "presto" else 0.0
        fraction = 0.2 if args.safety_fraction is None else args.safety_fraction
        return DARecipe(tokenizer, safety, chat, safety_fraction=fraction, presto_weight=weight, system=system,
                        presto_layer_mean=(args.presto_layers or "mean") == "mean")
    if recipe == "constrained":
        reference, _ = load_pretrained(args.reference or args.model, device=training_device(args.device),
                                       dtype=weights_dtype(args))
        return ConstrainedRecipe(tokenizer, chat, reference, cache_reference=not online, system=system)
    default = PURE_BAD_SYSTEM if args.attack in ("harmful", "backdoor") else None
    if recipe == "ft-attack" and data["attack_data"]:
        from deepalign.training.ft_attacks import AttackData

        attack_system = next((s for s in (system, data["attack_system"], default) if s is not None), None)
        rows = data["attack_data"][:args.limit] if args.limit else data["attack_data"]
        data = {**data, "attack": AttackData(rows, attack_system)}
    if recipe == "ft-attack":
        options = {"limit": args.limit} if args.limit else {}
        if args.attack == "identity":
            options.update(system=system if system is not None else AOA_SYSTEM,
                           prefix=args.identity_prefix or AOA_PREFIX)
        if args.attack == "backdoor" and args.trigger:
            options["trigger"] = args.trigger
        data = data.get("attack") or build_attack(args.attack, safety, chat, **options)
        attack_system = next((s for s in (data.system, system, default) if s is not None), None)
        if (args.objective or "sft") == "sft":
            return SFTRecipe(tokenizer, data.rows, system=attack_system)
        reference, _ = load_pretrained(args.reference or args.model, device=training_device(args.device),
                                       dtype=weights_dtype(args))
        return ConstrainedRecipe(tokenizer, data.rows, reference, system=attack_system, cache_reference=not online)
    from deepalign.training.cls_recipe import CLSRecipe

    stage = recipe.removeprefix("cls-")
    malicious = [UtilityExample(r.prompt, r.refusal if stage == "sft" else r.harmful_response) for r in safety]
    texts = data["texts"] + data["malicious_texts"]
    return CLSRecipe(tokenizer, stage, texts=texts, malicious=malicious, benign=chat, cls_weight=args.cls_weight)


def weights_dtype(args: argparse.Namespace) -> str:
    """``--dtype``, with ``auto`` read as float32 (the trained weights' dtype, not an inference choice)."""
    return "float32" if args.dtype == "auto" else args.dtype


def load_model(args: argparse.Namespace):
    """The starting model; the cls-* recipes give it the [CLS] token and head unless it has them."""
    from deepalign.models.loading import load_pretrained

    if args.recipe not in CLS:
        return load_pretrained(args.model, attn_implementation="deepalign" if args.recipe == "presto" else None,
                               dtype=weights_dtype(args))
    from transformers import AutoConfig

    from deepalign.models.loading import resolve_source
    from deepalign.models.safety_cls import CONFIG_KEY, add_safety_cls, load_safety_cls

    folder, gguf = resolve_source(args.model)
    if gguf is None and getattr(AutoConfig.from_pretrained(folder, local_files_only=True), CONFIG_KEY, None):
        return load_safety_cls(folder, dtype=weights_dtype(args))
    model, tokenizer = load_pretrained(args.model, dtype=weights_dtype(args))
    add_safety_cls(model, tokenizer, seed=args.seed)
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    from deepalign.training.trainer import Trainer

    taken = apply_config(args)
    if taken:
        print(f"from {args.config}: " + ", ".join(f"{k.replace('_', '-')}={v}" for k, v in taken.items()))
    check_options(args)
    args.dtype = weights_dtype(args)  # auto and float32 are one run
    data = read_data(args)
    if args.epochs is not None:
        args.steps = steps_for_epochs(args, data)
        print(f"{args.epochs} epochs = {args.steps} optimizer steps")
    config = trainer_config(args)
    model, tokenizer = load_model(args)
    if args.chat_template:
        from deepalign.models.chat import set_chat_template

        set_chat_template(tokenizer, chat_template_text(args.chat_template))
    history = Trainer(model, tokenizer, build_recipe(args, tokenizer, data), config).train()
    last = history[-1] if history else {}
    print(f"trained {args.recipe} for {len(history)} steps; last step: "
          + ", ".join(f"{k}={v}" for k, v in last.items() if k != "step"))
    print(f"model: {args.output}/final   metrics: {args.output}/metrics.jsonl")
    return 0
