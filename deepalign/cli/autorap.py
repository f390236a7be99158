"""``deepalign autorap {data,train}``: the AutoRAP classifier's refusal data and its training."""

from __future__ import annotations

import argparse

from deepalign.cli.args import (add_model_options, add_training_model_options, existing_dir, existing_file, model_source, non_negative_int, output_dir, output_file,
                                positive_float, positive_int)
from deepalign.errors import InputError


def register(commands) -> None:
    autorap = commands.add_parser("autorap", help="AutoRAP classifier: refusal data (data) and training (train)")
    steps = autorap.add_subparsers(dest="step", required=True, metavar="STEP")
    data = steps.add_parser("data", help="candidate refusal tokens and the target's refusal continuations")
    data.add_argument("--model", required=True, type=model_source, help="the target model")
    data.add_argument("--targets", type=existing_file,
                      help="benchmark file with harmful responses (AdvBench, JBB, Harmful HEx-PHI)")
    data.add_argument("--format")
    data.add_argument("--world", type=existing_dir, help="synthetic world folder instead of --targets")
    data.add_argument("--limit", type=positive_int)
    data.add_argument("--output", required=True, type=output_file, help="JSON-lines AutoRAP data")
    data.add_argument("--k", type=positive_int, default=20, help="top-k counted per row (default 20)")
    data.add_argument("--threshold", type=positive_int, default=2, help="minimum count tau (default 2)")
    data.add_argument("--max-new-tokens", type=positive_int, default=512)
    data.add_argument("--seed", type=non_negative_int, default=0)
    add_model_options(data)
    data.set_defaults(run=run)
    train = steps.add_parser("train", help="train the token classifier on the data (re-drawn augmentation)")
    train.add_argument("--data", required=True, type=existing_file, help="output of deepalign autorap data")
    train.add_argument("--helper", required=True, type=model_source, help="local model to turn into the classifier")
    train.add_argument("--target", required=True, type=model_source,
                       help="the target model (its tokenizer cuts the prefills)")
    train.add_argument("--output", required=True, type=output_dir)
    train.add_argument("--steps", type=positive_int, default=200)
    train.add_argument("--batch-size", type=positive_int, default=8)
    train.add_argument("--lr", type=positive_float, default=2e-5)
    train.add_argument("--seed", type=non_negative_int, default=0)
    add_training_model_options(train)
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return make_data(args) if args.step == "data" else train_helper(args)


def make_data(args: argparse.Namespace) -> int:
    from deepalign.attacks.autorap import build_dataset, write_dataset
    from deepalign.attacks.runner import load_targets
    from deepalign.data.synthetic import SyntheticWorld
    from deepalign.models.loading import load_pretrained

    world = SyntheticWorld.load(args.world) if args.world else None
    targets = [t for t in load_targets(args.targets, world, args.format, args.limit) if t.harmful_response]
    if not targets:
        raise InputError("no target has a harmful response (use AdvBench, JBB, Harmful HEx-PHI or --world)")
    model, tokenizer = load_pretrained(args.model, device=args.device, dtype=args.dtype)
    rows = build_dataset(model, tokenizer, [(t.prompt, t.harmful_response) for t in targets], k=args.k,
                         threshold=args.threshold, max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(f"{len(rows)} rows, {len(rows[0].refusals)} candidate refusal tokens each: {write_dataset(args.output, rows)}")
    return 0


def train_helper(args: argparse.Namespace) -> int:
    from transformers import AutoModelForTokenClassification

    from deepalign.attacks.autorap import AutoRAPRecipe, read_dataset
    from deepalign.cli.attack import _tokenizer_of
    from deepalign.cli.train import weights_dtype
    from deepalign.io import file_fingerprint
    from deepalign.models.loading import resolve_dtype, resolve_source
    from deepalign.training.trainer import Trainer, TrainerConfig

    rows = read_dataset(args.data)
    folder, gguf = resolve_source(args.helper)
    helper_tokenizer = _tokenizer_of(args.helper)
    if helper_tokenizer.pad_token_id is None:
        helper_tokenizer.pad_token = helper_tokenizer.eos_token
    helper = AutoModelForTokenClassification.from_pretrained(folder, gguf_file=gguf, num_labels=2, local_files_only=True,
                                                             dtype=resolve_dtype(weights_dtype(args)),
                                                             pad_token_id=helper_tokenizer.pad_token_id)
    recipe = AutoRAPRecipe(helper_tokenizer, _tokenizer_of(args.target), rows)
    config = TrainerConfig(output_dir=str(args.output), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           seed=args.seed, checkpoint_every=max(1, args.steps // 4), device=args.device,
                           run_settings={"dtype": weights_dtype(args),
                                         **{name: file_fingerprint(getattr(args, name))
                                            for name in ("data", "helper", "target")}})
    history = Trainer(helper, helper_tokenizer, recipe, config).train()
    print(f"trained the AutoRAP classifier for {len(history)} steps; last: loss={history[-1]['loss']}, "
          f"accuracy={history[-1]['accuracy']}; model: {args.output}/final")
    return 0
