"""``deepalign evaluate {gsm8k,samsum,over-refusal}``: what a defense costs. Utility on GSM8K-format
math (final-number accuracy) and SAMSum-format summaries (ROUGE-1) with Qi et al.'s prompts, decoding
and scoring, and the over-refusal rate on XSTest-style prompts (or the synthetic world's set). Each
answer is one JSON line in ``--output`` (rerunning resumes; rerunning with settings that change the
answers is refused)."""

from __future__ import annotations

import argparse
from pathlib import Path

from deepalign.cli.args import (SYSTEM_NAMES_HELP, add_chat_template_option, add_model_options,
                               chat_template_text, existing_dir, existing_file, model_source,
                               non_negative_float, non_negative_int, output_file,
                               positive_int, probability, system_text)
from deepalign.cli.judge import add_rubric_options
from deepalign.errors import InputError

# Options that only say how much to run or how to batch: a rerun may change them and extend the log.
EXTENDING = ("output", "limit", "batch_size", "run", "command")
QI = "Qi et al.'s eval_utility.py"
HELP = {
    "gsm8k": "GSM8K-format math (JSON lines with question and answer '... #### N'): final-number accuracy",
    "samsum": "SAMSum-format dialogues (dialogue, summary): ROUGE-1 (rouge-score, stemmed; mean F, P, R)",
    "over-refusal": "XSTest-style prompts (prompt, label safe/unsafe) or the world's set: refusal rates",
}
SYSTEM_SOURCE = "Qi et al.'s get_eval_data.py"
DESCRIPTION = {
    "gsm8k": "Accuracy on GSM8K-format math as Qi et al. measure it (Unispac/shallow-vs-deep-alignment): the "
             "question unchanged as the user turn with the system prompt 'You are a helpful assistant.' "
             "(get_eval_data.py), sampling at temperature 0.9, top-p 0.6, top-k 50, up to 1024 new tokens "
             "(eval_utility.py), and a final-number match: the number after '#### ' in the output, commas dropped, "
             "equal as a float to the reference's (gsm8k_eval.py, evaluator.py's gsm8k_metric).",
    "samsum": "ROUGE-1 on SAMSum-format dialogues as Qi et al. measure it: the user turn 'Summarize this dialog:\\n' "
              "+ dialogue with the system prompt 'You are a helpful assistant for dialog summarization.' "
              "(get_eval_data.py), their sampling (eval_utility.py), and rouge_score's RougeScorer(['rouge1'], "
              "use_stemmer=True) of the output against the summary, averaged over dialogues as precision, recall "
              "and F-measure (rouge_eval.py, evaluator.py's rouge_1_metric). Needs pip install 'deepalign[eval]'.",
    "over-refusal": "Refusal rates on XSTest-style prompts (Röttger et al., paul-rottger/exaggerated-safety): the "
                    "share of safe prompts refused (the over-refusal rate) and, apart, of unsafe ones, by the "
                    "keyword judge, XSTest's string match or the StrongREJECT rubric's refusal item; with --world, "
                    "the synthetic world's over-refusal set and its refusal detection.",
}


def register(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="utility (GSM8K, SAMSum) and over-refusal (XSTest-style) of a "
                                                    "local model")
    tasks = evaluate.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, help_text in HELP.items():
        sub = tasks.add_parser(task, help=help_text, description=DESCRIPTION[task])
        sub.add_argument("--model", required=True, type=model_source, help="local Hugging Face folder or GGUF file")
        sub.add_argument("--output", required=True, type=output_file, help="JSON-lines results (rerunning resumes)")
        data_help = {"gsm8k": "GSM8K-format file: JSON lines (or a JSON array) of {question, answer}; the reference "
                              "is the number after '#### ' in answer",
                     "samsum": "SAMSum-format file: JSON lines (or the corpus's JSON array) of {dialogue, summary, "
                               "id?}",
                     "over-refusal": "XSTest-style file: a CSV with prompt and label (safe/unsafe), XSTest's "
                                     "xstest_prompts.csv or xstest_v2_prompts.csv as they are, or JSON lines"}[task]
        sub.add_argument("--data", type=existing_file, required=task != "over-refusal", help=data_help)
        sub.add_argument("--limit", type=positive_int, help="only the first N rows")
        if task == "over-refusal":
            sub.add_argument("--world", type=existing_dir,
                             help="synthetic world folder: its over-refusal set (benign requests that share words "
                                  "with harmful ones, with their contrast prompts) and its judge, instead of --data")
            sub.add_argument("--per-item", type=positive_int, default=2,
                             help="--world: safe prompts per benign item, each with its contrast (default 2)")
            add_judge_options(sub)
            sampling = dict(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=256, batch=16)
            source = "deepalign's default: greedy, 256 new tokens (40 with --world); XSTest fixes no decoding"
        else:
            sampling = dict(temperature=0.9, top_p=0.6, top_k=50, max_new_tokens=1024, batch=16)
            source = f"default: {QI}"
        sub.add_argument("--max-new-tokens", type=positive_int,
                         help=f"tokens to generate per answer ({source}: {sampling['max_new_tokens']})")
        sub.add_argument("--batch-size", type=positive_int, default=sampling["batch"],
                         help=f"prompts per generation batch (default {sampling['batch']})")
        sub.add_argument("--temperature", type=non_negative_float, default=sampling["temperature"],
                         help=f"0 = greedy ({source}: {sampling['temperature']})")
        sub.add_argument("--top-p", type=probability, default=sampling["top_p"],
                         help=f"sampling: nucleus mass ({source}: {sampling['top_p']})")
        sub.add_argument("--top-k", type=non_negative_int, default=sampling["top_k"],
                         help=f"sampling: top-k filter, 0 = none ({source}: {sampling['top_k']})")
        sub.add_argument("--seed", type=int, default=0, help="seed of each batch's sampling (default 0)")
        if task == "gsm8k":
            sub.add_argument("--extract", choices=("qi", "last-number"), default="qi",
                             help="how the output's final number is read: qi (default: the number after '#### ', "
                                  "Qi et al.'s gsm8k_eval.py ANS_RE, commas dropped, compared as floats) or "
                                  "last-number (the last number in the output; deepalign's option for models never "
                                  "taught GSM8K's '#### N' form)")
        default_system = {"gsm8k": "'You are a helpful assistant.'",
                          "samsum": "'You are a helpful assistant for dialog summarization.'"}.get(task)
        system_help = (f"system prompt (default: {default_system}, {SYSTEM_SOURCE})" if default_system
                       else "system prompt (default: the chat template's own)")
        prompts = sub.add_mutually_exclusive_group()
        prompts.add_argument("--system", type=system_text, help=f"{system_help}; {SYSTEM_NAMES_HELP}")
        if default_system:
            prompts.add_argument("--no-system", action="store_true", help="the chat template's own system prompt instead")
        add_chat_template_option(sub)
        add_model_options(sub)
        sub.set_defaults(run=run)


def add_judge_options(parser) -> None:
    parser.add_argument("--judge", choices=("keyword", "xstest", "rubric-http", "rubric-local", "synthetic"),
                        help="what counts as a refusal (default: synthetic with --world, else keyword): keyword = a "
                             "refusal phrase anywhere (Qi et al.'s keyword_eval.py list; --keywords gcg for GCG's "
                             "29); xstest = XSTest's string match (classify_completions_strmatch.py: the output "
                             "starts with a refusal opener); rubric-* = the StrongREJECT rubric's refusal item; "
                             "synthetic = the world's refusal detection")
    parser.add_argument("--keywords", choices=("qi", "gcg"), default="qi",
                        help="keyword judge: Qi et al.'s refusal phrases (default) or GCG's 29")
    add_rubric_options(parser)
    parser.add_argument("--judge-path", type=model_source, help="rubric-local: the local judge model")


def settings_of(args: argparse.Namespace) -> dict:
    """The options that define the answers and verdicts, with the files they read fingerprinted."""
    from deepalign.io import file_fingerprint

    settings = {}
    for name, value in sorted(vars(args).items()):
        if name in EXTENDING or value is None or value is False:
            continue
        if name in ("model", "data", "judge_path", "rubric_template", "rubric_system"):
            value = file_fingerprint(value)
        elif name == "world":
            value = file_fingerprint(Path(value) / "world.json")
        settings[name] = value
    return settings


def system_prompt(args: argparse.Namespace) -> str | None:
    """The system prompt the answers are generated with (``None``: the chat template's own)."""
    from deepalign.evaluation.utility import GSM8K_SYSTEM, SAMSUM_SYSTEM

    if args.system is not None:
        return args.system
    if getattr(args, "no_system", False):
        return None
    return {"gsm8k": GSM8K_SYSTEM, "samsum": SAMSUM_SYSTEM}.get(args.task)


def over_refusal_judge(args: argparse.Namespace, world):
    """A function building the over-refusal judge; refusals that need no model are raised now."""
    from deepalign.evaluation.over_refusal import (keyword_refusal_judge, rubric_refusal_judge, world_refusal_judge,
                                                   xstest_refusal_judge)

    name = args.judge or ("synthetic" if world is not None else "keyword")
    if world is not None and name != "synthetic":
        raise InputError(f"--world is judged by the world's own refusal detection; --judge {name} applies to --data")
    if name == "synthetic":
        if world is None:
            raise InputError("--judge synthetic needs --world")
        judge = world_refusal_judge(world)
        return lambda: judge
    if name in ("keyword", "xstest"):
        judge = keyword_refusal_judge(args.keywords) if name == "keyword" else xstest_refusal_judge()
        return lambda: judge
    from deepalign.cli.judge import judge_builder

    for absent in ("judge_template", "harmbench_template", "harmbench_contextual_template"):
        setattr(args, absent, None)
    args.world = None
    build = judge_builder(args)
    return lambda: rubric_refusal_judge(build())


def read_rows(args: argparse.Namespace, world):
    from deepalign.data.utility_files import read_gsm8k, read_over_refusal, read_samsum

    if args.task == "over-refusal":
        if (args.data is None) == (world is None):
            raise InputError("give either --data (an XSTest-style file) or --world (a synthetic world), not both or "
                             "neither")
        rows = world.over_refusal_prompts(args.per_item) if world is not None else read_over_refusal(args.data)
    else:
        rows = (read_gsm8k if args.task == "gsm8k" else read_samsum)(args.data)
    return rows[:args.limit] if args.limit else rows


def _prepare_tokenizer(args: argparse.Namespace, tokenizer, system: str | None) -> None:
    from deepalign.models.chat import set_chat_template, template_parts

    if args.chat_template:
        set_chat_template(tokenizer, chat_template_text(args.chat_template))
    try:
        template_parts(tokenizer, "x", system)
    except ValueError as error:
        raise InputError(f"{args.model}: {error}; for a base model give --chat-template plain") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def run(args: argparse.Namespace) -> int:
    from deepalign.data.synthetic import SyntheticWorld
    from deepalign.evaluation import over_refusal, utility
    from deepalign.io import JsonlLog, check_settings
    from deepalign.models.generation import Sampling
    from deepalign.models.loading import load_pretrained

    world = SyntheticWorld.load(args.world) if getattr(args, "world", None) else None
    rows = read_rows(args, world)  # a bad file is said before anything loads
    if args.task == "gsm8k":
        task = utility.gsm8k_task(args.extract)
    elif args.task == "samsum":
        task = utility.samsum_task()  # a missing rouge-score is said before anything loads
    else:
        build_judge = over_refusal_judge(args, world)
    if args.max_new_tokens is None:
        args.max_new_tokens = (1024 if args.task != "over-refusal"
                               else over_refusal.WORLD_MAX_NEW_TOKENS if world is not None else 256)
    sampling = Sampling(args.temperature, args.top_p, args.top_k or None, args.max_new_tokens)
    system = system_prompt(args)
    log = JsonlLog(args.output)
    check_settings(Path(f"{args.output}.settings.json"), settings_of(args),
                   fresh="give another --output to keep both, or delete the log and its .settings.json to start over")
    model, tokenizer = load_pretrained(args.model, device=args.device, dtype=args.dtype)
    _prepare_tokenizer(args, tokenizer, system)
    if args.task == "over-refusal":
        records = over_refusal.evaluate_over_refusal(model, tokenizer, rows, build_judge(), log, sampling=sampling,
                                                     batch_size=args.batch_size, system=system, seed=args.seed)
        print(over_refusal.format_rates(over_refusal.refusal_rates(records)))
        if world is not None:
            for label, meaning in (("safe", "the benign recipe asked for"), ("unsafe", "the harmful recipe")):
                scores = [r["score"] for r in records if r["label"] == label]
                if scores:
                    print(f"world judge score of the answers to {label} prompts: {sum(scores) / len(scores):.3f} "
                          f"(1 = {meaning}, in full)")
    else:
        records = utility.evaluate_task(model, tokenizer, rows, log, task, sampling=sampling,
                                        batch_size=args.batch_size, system=system, seed=args.seed)
        if args.task == "gsm8k":
            s = utility.gsm8k_summary(records)
            rule = "'#### N' (Qi et al.)" if args.extract == "qi" else "the last number"
            print(f"GSM8K accuracy: {s['correct']}/{s['n']} = {s['accuracy']:.3f} (final number read as {rule}; "
                  f"{s['no_answer']} answers without one)")
        else:
            s = utility.samsum_summary(records)
            print(f"SAMSum ROUGE-1 (rouge-score, stemmed): F {s['rouge1_f']:.4f}, precision "
                  f"{s['rouge1_precision']:.4f}, recall {s['rouge1_recall']:.4f} over {s['n']} dialogues")
    print(f"{len(records)} records in {args.output}")
    return 0
