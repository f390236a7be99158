"""``deepalign selfcheck``: the fused kernels against their references and float64."""

from __future__ import annotations

import argparse

from deepalign.cli.args import non_negative_int


def register(commands) -> None:
    check = commands.add_parser("selfcheck", help="check the fused kernels against their references")
    check.add_argument("--seed", type=non_negative_int, default=0, help="random seed for the inputs (default 0)")
    check.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deepalign.kernels.selfcheck import run_selfcheck

    return 1 if run_selfcheck(args.seed) else 0
