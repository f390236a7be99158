"""``deepalign demo`` and ``deepalign stages``: the synthetic-world studies, end to end."""

from __future__ import annotations

import argparse
import time

from deepalign.cli.args import WORLD_HELP, non_negative_int, output_dir, positive_int
from deepalign.data.synthetic import DEFAULT_WORLD, WORLD_VERSIONS


def register(commands) -> None:
    demo = commands.add_parser("demo", help="shallow vs deep vs PRESTO on the synthetic world, end to end")
    demo.add_argument("--quick", action="store_true", help="a smoke run: one seed, a smaller model and shorter training (its "
                                                               "numbers are not the study's; labelled so)")
    demo.add_argument("--seeds", type=non_negative_int, nargs="+", help="seeds (default 0 1 2; --quick: 0)")
    demo.add_argument("--output", type=output_dir,
                      help="output folder (default runs/demo, or runs/demo-quick with --quick; reruns resume)")
    demo.add_argument("--world", choices=WORLD_VERSIONS, default=DEFAULT_WORLD, help=WORLD_HELP)
    demo.set_defaults(run=run_demo)

    stages = commands.add_parser("stages", help="train and evaluate base, shallow, DA and PRESTO on the world")
    stages.add_argument("--output", required=True, type=output_dir, help="folder for the models and reports.json "
                                                                         "(resumable)")
    stages.add_argument("--seed", type=non_negative_int, default=0, help="world and training seed (default 0)")
    stages.add_argument("--world", choices=WORLD_VERSIONS, default=DEFAULT_WORLD, help=WORLD_HELP)
    stages.add_argument("--pretrain-steps", type=positive_int,
                        help="base-model steps (default: 1500 on v1, 3000 on v2)")
    stages.add_argument("--align-steps", type=positive_int,
                        help="steps of DA and PRESTO (default: 150 on v1, 350 on v2; refusal-only SFT trains 600)")
    stages.set_defaults(run=run_stages)


def run_demo(args: argparse.Namespace) -> int:
    from deepalign.experiments.demo import (DemoSettings, default_output, demo_job, format_table,
                                            gcg_against_no_attack, run_demo, write_demo_report)
    from deepalign.io import JsonlLog

    seeds = args.seeds if args.seeds else ([0] if args.quick else [0, 1, 2])
    output = args.output or default_output(args.quick)
    start = time.perf_counter()
    settings = DemoSettings(seeds=tuple(seeds), quick=args.quick, world=args.world)
    job = demo_job(settings)
    rows = run_demo(output, settings, job=job)
    print(format_table(rows, quick=args.quick))
    for line in gcg_against_no_attack(JsonlLog(f"{output}/results.jsonl").records(), seeds):
        print(line)
    report = write_demo_report(output, rows, seeds[0], quick=args.quick, seeds=seeds, job=job)
    print(f"({time.perf_counter() - start:.0f} s, seeds {seeds}) results: {output}/results.jsonl  report: {report}")
    return 0


def run_stages(args: argparse.Namespace) -> int:
    from deepalign.experiments.stages import StageSettings, format_reports, run_stages

    given = {"pretrain_steps": args.pretrain_steps, "align_steps": args.align_steps}
    settings = StageSettings.for_world(args.world, seed=args.seed,
                                       **{name: value for name, value in given.items() if value is not None})
    start = time.perf_counter()
    reports = run_stages(args.output, settings)
    print(format_reports(reports))
    print(f"({time.perf_counter() - start:.0f} s; models and reports.json in {args.output})")
    return 0
