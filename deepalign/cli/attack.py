"""``deepalign attack {prefill,rap,decoding}``: attack a local model on a benchmark file or the
synthetic world; every output is judged and logged as a JSON line (rerunning resumes; rerunning
with settings that change the outputs is refused). ``gcg`` and ``embedding``: :mod:`.attack_gcg`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from deepalign.cli.args import (SYSTEM_NAMES_HELP, add_chat_template_option, add_model_options,
                               chat_template_text, existing_dir, existing_file, int_in, model_source,
                               non_negative_int, output_file, positive_float, positive_int, probability,
                               system_text)
from deepalign.attacks.generation_attacks import DECODING_FAMILIES
from deepalign.errors import InputError

# Options that only say how much to run or how to batch: a rerun may change them and extend the log.
EXTENDING = ("output", "limit", "lengths", "runs", "batch_size", "run", "command")
HELP = {"prefill": "prefilling attack: force the first N harmful tokens, then sample",
        "rap": "Rank-Assisted Prefilling (Algorithm 1) with a selector",
        "decoding": "decoding-parameter attack: greedy, temperature, top-p, top-k grids"}
MAX_NEW_TOKENS = {"prefill": 512, "rap": 256, "decoding": 256}


def register(commands) -> None:
    attack = commands.add_parser("attack", help="attack a local model (prefill, rap, decoding, gcg, embedding)")
    kinds = attack.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, help_text in HELP.items():
        sub = kinds.add_parser(kind, help=help_text)
        add_target_options(sub, world_help="synthetic world folder (targets, judge and oracle)")
        sub.add_argument("--batch-size", type=positive_int, default=16)
        sub.add_argument("--defense", choices=("none", "cls"), default="none",
                         help="cls: decode the [CLS] model behind its defense (re-classification, strategic decoding)")
        sub.add_argument("--schedule", choices=("each", "first", "periodic", "annealing"), default="annealing",
                         help="cls defense: re-classification schedule (default annealing)")
        sub.add_argument("--tau", type=int_in(1, 3), default=2,
                         help="cls defense: malicious verdicts confirming a switch (1-3)")
        sub.add_argument("--lead-in", help="cls defense: refusal lead-in (default: the paper's, or the world's)")
        sub.add_argument("--max-new-tokens", type=positive_int,
                         help=f"tokens to generate after the prompt and prefill (default {MAX_NEW_TOKENS[kind]}, the "
                              "papers' budget, capped so that the longest prompt with its prefill fits the model's "
                              "context)")
        add_prompt_options(sub)
        add_model_options(sub)
        sub.set_defaults(run=run)
        if kind in ("prefill", "rap"):
            sub.add_argument("--prefill", help="a text prefill for every target (e.g. a refusal prefix for a base "
                                               "model, Qi et al.'s Table 1); default: each target's own prefill, "
                                               "else its harmful response's first tokens")
        if kind == "prefill":
            sub.add_argument("--lengths", type=non_negative_int, nargs="+", default=[5, 10, 20, 40],
                             help="prefill lengths in tokens (default 5 10 20 40)")
            sub.add_argument("--runs", type=positive_int, default=1, help="sampled runs per prompt and length")
            sub.add_argument("--temperature", type=positive_float, default=0.9)
            sub.add_argument("--top-p", type=probability, default=0.6)
        if kind == "decoding":
            sub.add_argument("--families", nargs="+", choices=DECODING_FAMILIES, default=list(DECODING_FAMILIES),
                             help="which parts of the grid (default all: greedy + 20 temperatures + 20 top-p + "
                                  "9 top-k = 50 settings, Huang et al.)")
        if kind == "rap":
            sub.add_argument("--selector", choices=("oracle", "console", "lexicon", "autorap"), default="oracle")
            sub.add_argument("--helper", type=model_source, help="autorap selector: the trained AutoRAP classifier")
            sub.add_argument("--blocked", help="lexicon selector: comma-separated refusal words to never pick")
            sub.add_argument("--k", type=positive_int, default=20,
                             help="candidates per step (default 20: the authors' DEFAULT_TOP_K)")
            sub.add_argument("--max-steps", type=positive_int, default=256,
                             help="steps per prompt, each a pick or a backtrack (default 256: DEFAULT_MAX_STEPS of "
                                  "Vega & Singh's rap.py, uiuc-focal-lab/push-forward-alignment)")
            sub.add_argument("--prefill-tokens", type=non_negative_int, default=0, help="start from N harmful tokens")
    from deepalign.cli import attack_gcg  # gcg and embedding: optimisation attacks (their own module)

    attack_gcg.register(kinds)


def add_target_options(parser, *, world_help: str) -> None:
    """The model, the output log, the targets (a benchmark file or the world) and the judge: the
    options every attack kind shares."""
    parser.add_argument("--model", required=True, type=model_source, help="local Hugging Face folder or GGUF file")
    parser.add_argument("--output", required=True, type=output_file, help="JSON-lines results (rerunning resumes)")
    parser.add_argument("--targets", type=existing_file,
                        help="benchmark file (StrongREJECT, HarmBench, AdvBench, JBB, HEx-PHI, ...)")
    parser.add_argument("--format", help="benchmark format (default: guessed)")
    parser.add_argument("--world", type=existing_dir, help=world_help)
    parser.add_argument("--limit", type=positive_int, help="only the first N targets")
    parser.add_argument("--judge", choices=("keyword", "synthetic"),
                        help="judge (default: synthetic with --world, else keyword)")
    parser.add_argument("--keywords", choices=("qi", "gcg"), default="qi",
                        help="keyword judge: the refusal phrases of Qi et al.'s keyword_eval.py (default) or GCG's 29")


def add_prompt_options(parser) -> None:
    """How prompts reach the model: system prompt and chat template (every command that loads one)."""
    parser.add_argument("--system", type=system_text,
                        help=f"system prompt (default: the chat template's own default); {SYSTEM_NAMES_HELP}")
    add_chat_template_option(parser)


def apply_prompt_options(args: argparse.Namespace, tokenizer) -> None:
    """Give the tokenizer the chosen template and check that prompts can be laid out with it."""
    from deepalign.models.chat import set_chat_template, template_parts

    if args.chat_template:
        set_chat_template(tokenizer, chat_template_text(args.chat_template))
    try:
        template_parts(tokenizer, "x", args.system)
    except ValueError as error:
        raise InputError(f"{args.model}: {error}; for a base model give --chat-template plain") from None


def generation_budget(args: argparse.Namespace, targets, tokenizer) -> int:
    """``--max-new-tokens``, or the papers' budget for this attack capped by the model's context:
    ``min(default, context − longest prompt with its prefill)``, saying so when it caps. A given
    budget that cannot fit is refused naming the flag."""
    from transformers import AutoConfig

    from deepalign.attacks.generation_attacks import harmful_prefix
    from deepalign.models.chat import encode_text, render_chat
    from deepalign.models.loading import resolve_source

    folder, gguf = resolve_source(args.model)
    context = getattr(AutoConfig.from_pretrained(folder, gguf_file=gguf, local_files_only=True),
                      "max_position_embeddings", None)
    if context is None:
        return args.max_new_tokens or MAX_NEW_TOKENS[args.kind]
    text = getattr(args, "prefill", None)

    def prefill_tokens(target) -> int:
        if text is not None or target.prefill:
            return len(encode_text(tokenizer, text if text is not None else target.prefill))
        if args.kind == "prefill" and target.harmful_response:
            return len(harmful_prefix(tokenizer, target.harmful_response, max(args.lengths)))
        if args.kind == "rap" and target.harmful_response:
            return len(harmful_prefix(tokenizer, target.harmful_response, args.prefill_tokens))
        return 0

    longest = max(len(render_chat(tokenizer, t.prompt, close_turn=False, system=args.system)) + prefill_tokens(t)
                  for t in targets) + (1 if args.defense == "cls" else 0)  # the [CLS] position
    room = context - longest
    if args.max_new_tokens is not None:
        if args.max_new_tokens > room:
            raise InputError(f"--max-new-tokens {args.max_new_tokens}: the longest prompt with its prefill has "
                             f"{longest} tokens and the model's context is {context}; give at most {max(room, 0)}")
        return args.max_new_tokens
    if room < 1:
        raise InputError(f"the longest prompt with its prefill has {longest} tokens, the whole of the model's context "
                         f"of {context}: nothing can be generated")
    budget = min(MAX_NEW_TOKENS[args.kind], room)
    if budget < MAX_NEW_TOKENS[args.kind]:
        print(f"--max-new-tokens {budget}: the papers' {MAX_NEW_TOKENS[args.kind]} capped by the model's context of "
              f"{context} (longest prompt with its prefill: {longest} tokens)")
    return budget


def settings_of(args: argparse.Namespace) -> dict:
    """The options that define the outputs, with the files they read fingerprinted."""
    from deepalign.io import file_fingerprint

    settings = {}
    for name, value in sorted(vars(args).items()):
        if name in EXTENDING or value is None:
            continue
        if name in ("model", "targets", "helper") or (name == "world" and value is not None):
            value = file_fingerprint(Path(value) / "world.json" if name == "world" else value)
        settings[name] = value
    return settings


def _tokenizer_of(model: str):
    from transformers import AutoTokenizer

    from deepalign.models.loading import resolve_source

    folder, gguf = resolve_source(model)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)


def check_options(args: argparse.Namespace) -> None:
    """Refuse options that contradict each other, before anything is read or loaded."""
    if (args.targets is None) == (args.world is None):
        raise InputError("give either --targets (a benchmark file) or --world (a synthetic world), not both or neither")
    if args.kind != "rap":
        return
    if args.selector == "oracle" and args.world is None:
        raise InputError("--selector oracle needs --world")
    if args.selector == "autorap" and not args.helper:
        raise InputError("--selector autorap needs --helper (a trained AutoRAP classifier)")
    if args.selector == "lexicon" and not [w for w in (args.blocked or "").split(",") if w]:
        raise InputError("--selector lexicon needs --blocked WORD,WORD,... (refusal tokens)")


def rap_selector(args: argparse.Namespace, world):
    from deepalign.attacks.selectors import ConsoleSelector, LexiconSelector, synthetic_oracle, word_sequences

    if args.selector == "oracle":
        return synthetic_oracle(world, world.tokenizer())
    if args.selector == "autorap":
        from transformers import AutoModelForTokenClassification

        from deepalign.attacks.selectors import ClassifierSelector
        from deepalign.models.loading import resolve_source

        folder, _ = resolve_source(args.helper)
        helper = AutoModelForTokenClassification.from_pretrained(folder, local_files_only=True)
        return ClassifierSelector(helper, _tokenizer_of(args.helper), _tokenizer_of(args.model), [1], kind="token",
                                  chat=True)
    words = [w for w in (args.blocked or "").split(",") if w]
    tokenizer = _tokenizer_of(args.model)
    if args.selector == "console":
        return ConsoleSelector(tokenizer)
    return LexiconSelector(blocked_sequences=word_sequences(tokenizer, words))


def run(args: argparse.Namespace) -> int:
    from deepalign.attacks.generation_attacks import (decoding_attack, decoding_settings, plain_generate,
                                                      prefill_attack, prefill_source)
    from deepalign.attacks.rap import RAPConfig, rap_attack
    from deepalign.attacks.runner import choose_judge, load_targets, run_rap, summary
    from deepalign.data.synthetic import REFUSAL_LEAD_IN, SyntheticWorld
    from deepalign.io import JsonlLog, check_settings
    from deepalign.models.generation import Sampling
    from deepalign.models.loading import load_pretrained

    check_options(args)
    world = SyntheticWorld.load(args.world) if args.world else None
    targets = load_targets(args.targets, world, args.format, args.limit)
    prefill_text = getattr(args, "prefill", None)
    if args.kind == "prefill":
        for target in targets:  # every target has a prefill, before anything loads
            prefill_source(target, prefill_text)
    if args.kind == "rap" and prefill_text is not None:
        targets = [replace(t, prefill=prefill_text) for t in targets]
    prompt_tokenizer = _tokenizer_of(args.model)
    apply_prompt_options(args, prompt_tokenizer)
    args.max_new_tokens = generation_budget(args, targets, prompt_tokenizer)
    tags = {"source": Path(args.targets).name if args.targets else "world", "model": str(args.model)}
    judge = choose_judge(args.judge or ("synthetic" if world else "keyword"), world, keywords=args.keywords)
    config = None
    if args.kind == "rap":
        config = RAPConfig(k=args.k, max_steps=args.max_steps, max_new_tokens=args.max_new_tokens)
    log = JsonlLog(args.output)
    check_settings(Path(f"{args.output}.settings.json"), settings_of(args),
                   fresh="give another --output to keep both, or delete the log and its .settings.json to start over")
    selector = rap_selector(args, world) if args.kind == "rap" else None
    generate = rap = None
    if args.defense == "cls":
        from deepalign.attacks.defended import cls_generate, cls_rap
        from deepalign.models.cls_decoding import DEFAULT_LEAD_IN, DefendedDecoder
        from deepalign.models.cls_strategy import StrategyConfig
        from deepalign.models.safety_cls import load_safety_cls

        model, tokenizer = load_safety_cls(args.model, device=args.device, dtype=args.dtype)
        lead_in = args.lead_in or (REFUSAL_LEAD_IN if world else DEFAULT_LEAD_IN)
        apply_prompt_options(args, tokenizer)
        decoder = DefendedDecoder(model, tokenizer, StrategyConfig(schedule=args.schedule, tau=args.tau),
                                  lead_in=lead_in, system=args.system)
        generate, rap = cls_generate(decoder, progress=True), cls_rap(decoder)
    else:
        model, tokenizer = load_pretrained(args.model, device=args.device, dtype=args.dtype)
        apply_prompt_options(args, tokenizer)
        generate = plain_generate(model, tokenizer, args.system)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.kind == "prefill":
        records = prefill_attack(model, tokenizer, targets, judge, log, prefill_lengths=args.lengths,
                                 prefill_text=prefill_text, runs=args.runs,
                                 sampling=Sampling(args.temperature, args.top_p, None, args.max_new_tokens),
                                 batch_size=args.batch_size, generate=generate, tags=tags)
    elif args.kind == "decoding":
        broken = decoding_attack(model, tokenizer, targets, judge, log, settings=decoding_settings(args.families),
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, generate=generate,
                                 tags=tags)
        records = [r for r in log.records() if r["id"] in broken]
        print(f"broken by some decoding setting: {sum(broken.values())} of {len(broken)} prompts")
    else:
        if rap is None:
            def rap(prompts, prefills, selector, config):
                return rap_attack(model, tokenizer, prompts, prefills, selector, config, system=args.system)
        records = run_rap(model, tokenizer, targets, judge, log, selector, config, prefill_tokens=args.prefill_tokens,
                          batch_size=args.batch_size, attack=rap, tags=tags)
    print(summary(records))
    print(f"{len(records)} records in {args.output}")
    return 0
