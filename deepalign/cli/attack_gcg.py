"""``deepalign attack gcg`` and ``deepalign attack embedding``: optimisation attacks toward a target
string (GCG's adversarial suffix; PGD on a suffix's input embeddings). Every target's attack is
judged and logged as one JSON line as soon as it is done (rerunning resumes with the next target;
rerunning with settings that change the outputs is refused)."""

from __future__ import annotations

import argparse
from pathlib import Path

from deepalign.cli.args import add_model_options, non_negative_int, positive_float, positive_int
from deepalign.errors import InputError

# The world's vocabulary has no "x": its suffixes start from a word it has.
WORLD_SUFFIX = " ".join(["the"] * 20)
HELP = {"gcg": "GCG (Zou et al.): optimise an adversarial suffix so the answer starts with a target string",
        "embedding": "embedding attack: PGD on a suffix's input embeddings within an L2 ball, toward a target"}


def _suffix_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must contain at least one token, got an empty string")
    return text


def _target_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a non-empty string")
    return text


def register(kinds) -> None:
    """Add ``gcg`` and ``embedding`` to ``deepalign attack``'s kinds."""
    from deepalign.cli.attack import add_prompt_options, add_target_options

    for kind, help_text in HELP.items():
        sub = kinds.add_parser(kind, help=help_text, description=help_text + ".")
        add_target_options(sub, world_help="synthetic world folder (targets and judge)")
        sub.add_argument("--target-text", type=_target_text,
                         help="the string every answer should start with (default: AdvBench's own target column, "
                              "the world's 'sure . to make ITEM :', else 'Sure, here is')")
        sub.add_argument("--suffix-init", type=_suffix_text,
                         help="the suffix's initial text (default: nanoGCG's 20 × 'x'; with --world 20 × 'the')")
        sub.add_argument("--max-new-tokens", type=positive_int, default=256,
                         help="greedy answer tokens generated after the attacked prompt (default 256)")
        sub.add_argument("--no-early-stop", dest="early_stop", action="store_false",
                         help="run every step even after the greedy answer matches the whole target")
        add_prompt_options(sub)
        add_model_options(sub)
        sub.set_defaults(run=run)
        if kind == "gcg":
            sub.add_argument("--num-steps", type=positive_int, default=250, help="GCG steps (default 250, nanoGCG)")
            sub.add_argument("--search-width", type=positive_int, default=512,
                             help="candidate suffixes per step (default 512, nanoGCG)")
            sub.add_argument("--topk", type=positive_int, default=256,
                             help="tokens per position by gradient (default 256, nanoGCG)")
            sub.add_argument("--n-replace", type=positive_int, default=1,
                             help="positions replaced per candidate (default 1, nanoGCG)")
            sub.add_argument("--seed", type=non_negative_int, default=0, help="seed of the candidate draws")
            sub.add_argument("--batch-size", type=positive_int, default=128,
                             help="candidates per forward pass (speed and memory only; default 128)")
            sub.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                             help="recompute the whole prompt for every candidate (slower; same losses)")
            sub.add_argument("--allow-non-ascii", action="store_true", help="let the suffix use non-ASCII tokens")
            sub.add_argument("--allow-special", dest="forbid_special", action="store_false",
                             help="let the suffix use special tokens other than BOS/EOS/pad/unk (as nanoGCG does)")
            sub.add_argument("--no-filter-ids", dest="filter_ids", action="store_false",
                             help="keep candidates whose text does not tokenise back to the same ids")
        else:
            sub.add_argument("--steps", type=positive_int, default=100,
                             help="PGD steps (default 100: Schwinn et al.'s embedding_attack_toxic.py)")
            sub.add_argument("--step-size", type=positive_float, default=0.01,
                             help="signed-gradient step in embedding units (default 0.01, Schwinn et al.; the "
                                  "update of Vega & Singh's embedding_attack)")
            sub.add_argument("--epsilon", type=positive_float, default=1.0,
                             help="L2 ball radius per suffix token, in mean embedding-row norms (the unit of Vega & "
                                  "Singh's embedding_attack; default 1, deepalign's choice: the release sets none)")
    kinds.choices["gcg"].epilog = ("Defaults are nanoGCG 0.3.0's GCGConfig (the GCG paper's settings); see "
                                   "deepalign.attacks.gcg.")


def run(args: argparse.Namespace) -> int:
    from deepalign.attacks.runner import choose_judge, load_targets, summary
    from deepalign.cli.attack import _tokenizer_of, apply_prompt_options, settings_of
    from deepalign.data.synthetic import SyntheticWorld
    from deepalign.io import JsonlLog, check_settings
    from deepalign.models.chat import encode_text
    from deepalign.models.loading import load_pretrained

    if (args.targets is None) == (args.world is None):
        raise InputError("give either --targets (a benchmark file) or --world (a synthetic world), not both or neither")
    if args.suffix_init is None:
        from deepalign.attacks.gcg import DEFAULT_SUFFIX

        args.suffix_init = WORLD_SUFFIX if args.world else DEFAULT_SUFFIX
    world = SyntheticWorld.load(args.world) if args.world else None
    targets = load_targets(args.targets, world, args.format, args.limit)
    tokenizer = _tokenizer_of(args.model)
    apply_prompt_options(args, tokenizer)
    ids = encode_text(tokenizer, args.suffix_init)
    if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
        raise InputError(f"--suffix-init {args.suffix_init!r} has words the model's tokenizer does not know "
                         f"({tokenizer.unk_token or 'no tokens'}); give words of its vocabulary")
    config = _config(args)
    judge = choose_judge(args.judge or ("synthetic" if world else "keyword"), world, keywords=args.keywords)
    tags = {"source": Path(args.targets).name if args.targets else "world", "model": str(args.model)}
    log = JsonlLog(args.output)
    check_settings(Path(f"{args.output}.settings.json"), settings_of(args),
                   fresh="give another --output to keep both, or delete the log and its .settings.json to start over")
    model, tokenizer = load_pretrained(args.model, device=args.device, dtype=args.dtype)
    apply_prompt_options(args, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    common = dict(target_text=args.target_text, system=args.system, max_new_tokens=args.max_new_tokens, tags=tags)
    if args.kind == "gcg":
        from deepalign.attacks.gcg import run_gcg

        records = run_gcg(model, tokenizer, targets, judge, log, config, **common)
    else:
        from deepalign.attacks.embedding import run_embedding

        records = run_embedding(model, tokenizer, targets, judge, log, config, **common)
    print(summary(records))
    matched = sum(bool(r.get("target_matched")) for r in records)
    print(f"target string matched by the greedy answer's first tokens: {matched} of {len(records)}")
    print(f"{len(records)} records in {args.output}")
    return 0


def _config(args: argparse.Namespace):
    if args.kind == "gcg":
        from deepalign.attacks.gcg import GCGConfig

        return GCGConfig(num_steps=args.num_steps, search_width=args.search_width, topk=args.topk,
                         n_replace=args.n_replace, suffix_init=args.suffix_init, batch_size=args.batch_size,
                         early_stop=args.early_stop, prefix_cache=args.prefix_cache,
                         allow_non_ascii=args.allow_non_ascii, forbid_special=args.forbid_special,
                         filter_ids=args.filter_ids, seed=args.seed)
    from deepalign.attacks.embedding import EmbeddingConfig

    return EmbeddingConfig(steps=args.steps, step_size=args.step_size, epsilon=args.epsilon,
                           suffix_init=args.suffix_init, early_stop=args.early_stop)
