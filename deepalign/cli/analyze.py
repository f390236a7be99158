"""``deepalign analyze …``: synthetic-world analyses as an offline HTML report."""

from __future__ import annotations

import argparse

from deepalign.cli.args import (SYSTEM_NAMES_HELP, add_chat_template_option, add_model_options,
                               chat_template_text, existing_dir, existing_file, output_file, positive_int,
                               system_text)
from deepalign.errors import InputError

WHAT = {"attention": "per-head mass on prefills, A vs B",
        "kl": "per-position KL(A||B)",
        "ranks": "harmful/refusal token ranks along harmful answers",
        "knockout": "harmful-token ranks when the answer may not read itself",
        "ablate": "prefilling and RAP scores with the top prefill-attending heads ablated",
        "report": "all of them on the models of deepalign stages (--world is its folder)"}
MODEL_COUNT = {"attention": (2, 2), "kl": (2, 2), "ablate": (1, 1), "ranks": (1, None), "knockout": (1, None),
               "report": (0, 0)}


def register(commands) -> None:
    analyze = commands.add_parser("analyze", help="analyses of synthetic-world models as an HTML report")
    analyze.add_argument("what", choices=tuple(WHAT), help="; ".join(f"{k}: {v}" for k, v in WHAT.items()))
    analyze.add_argument("--heads", type=positive_int, default=4, help="ablate: number of heads (default 4)")
    analyze.add_argument("--mode", choices=("zero", "mean"), default="zero", help="ablate: zero or mean ablation")
    analyze.add_argument("--max-steps", type=positive_int, default=256,
                         help="ablate: RAP step budget (default 256, the authors' DEFAULT_MAX_STEPS)")
    analyze.add_argument("--models", nargs="+", type=existing_dir,
                         help="model folders (two for attention and kl; one for ablate; none for report)")
    analyze.add_argument("--world", type=existing_dir, help="synthetic world folder (world.json): its harmful requests")
    analyze.add_argument("--targets", type=existing_file,
                         help="or a benchmark file whose targets carry harmful responses or prefills (AdvBench, "
                              "JailbreakBench, Harmful HEx-PHI, a prompt,prefill CSV); not for ablate and report")
    analyze.add_argument("--format", help="benchmark format (default: guessed)")
    analyze.add_argument("--limit", type=positive_int, help="only the first N targets of --targets")
    analyze.add_argument("--output", required=True, type=output_file, help="HTML report to write")
    add_model_options(analyze)
    add_chat_template_option(analyze)
    analyze.add_argument("--system", type=system_text,
                         help=f"system prompt of every example (default: the chat template's own); {SYSTEM_NAMES_HELP}")
    analyze.set_defaults(run=run)


def _check_models(args: argparse.Namespace) -> list:
    models = args.models or []
    low, high = MODEL_COUNT[args.what]
    if len(models) < low or (high is not None and len(models) > high):
        wanted = "no" if high == 0 else (f"exactly {low}" if low == high else f"at least {low}")
        raise InputError(f"analyze {args.what} takes {wanted} --models, got {len(models)}")
    return models


def run(args: argparse.Namespace) -> int:
    from deepalign.analysis.report import write_report
    from deepalign.data.synthetic import SyntheticWorld
    from deepalign.experiments import analyses
    from deepalign.experiments.corpus import benchmark_corpus, world_corpus

    models = _check_models(args)
    if (args.world is None) == (args.targets is None):
        raise InputError("give either --world (a synthetic world) or --targets (a benchmark file), not both or neither")
    if args.what in ("ablate", "report") and args.world is None:
        raise InputError(f"analyze {args.what} needs --world (it uses the world's judge and RAP oracle)")
    world = SyntheticWorld.load(args.world) if args.world else None
    corpus = world_corpus(world, phrasings=(0,) if args.what == "ranks" else (0, 1)) if world else \
        benchmark_corpus(args.targets, args.format, args.limit)
    loader = analyses.ModelLoader(args.device, args.dtype, chat_template_text(args.chat_template), args.system)
    if args.what == "report":
        sections = analyses.stages_report_sections(args.world, world, ablate_steps=args.max_steps)
        title = "deepalign: shallow, deep and PRESTO alignment on the synthetic world"
    else:
        title = f"deepalign analyze {args.what}"
        if args.what == "attention":
            sections = analyses.attention_section(models[0], models[1], corpus, loader=loader)
        elif args.what == "kl":
            sections = [analyses.kl_section(models[0], models[1], corpus, loader=loader)]
        elif args.what == "ablate":
            sections = [analyses.ablation_section(models[0], world, k=args.heads, mode=args.mode,
                                                  max_steps=args.max_steps)]
        elif args.what == "knockout":
            sections = [analyses.knockout_section(models, corpus, loader=loader)]
        else:
            sections = [analyses.ranks_section(models, corpus, loader=loader)]
    path = write_report(args.output, title, sections)
    for section in sections:
        print(f"== {section.title}")
        print("\n".join(section.text))
        for name, meaning in section.metrics:
            print(f"  {name}: {meaning}")
        if section.table:
            print(" | ".join(section.header))
            for row in section.table:
                print(" | ".join(str(c) for c in row))
    print(f"report: {path}   figure data: {path}.json")
    return 0
