"""The ``deepalign`` command: one module per subcommand, each parsing its arguments and calling the
library.

* ``deepalign selfcheck``: the fused kernels against their references (:mod:`.selfcheck`);
* ``deepalign train --recipe …``: every training recipe (:mod:`.train`);
* ``deepalign world``: the synthetic chat world's files (:mod:`.world`);
* ``deepalign attack {prefill,rap,decoding}``: attacks, judged and logged resumably (:mod:`.attack`);
* ``deepalign autorap {data,train}``: the AutoRAP classifier (:mod:`.autorap`);
* ``deepalign judge``: re-judging a result log (:mod:`.judge`);
* ``deepalign evaluate {gsm8k,samsum,over-refusal}``: utility and over-refusal (:mod:`.evaluate`);
* ``deepalign analyze …``: synthetic-world analyses as an HTML report (:mod:`.analyze`);
* ``deepalign demo`` and ``deepalign stages``: the synthetic-world studies (:mod:`.demo`).

Every error a user can cause ends the command with one line, ``deepalign COMMAND: message``, naming
the argument or the file and line, and exit code 2; Ctrl-C ends it with exit code 130 (a rerun
resumes). ``DEEPALIGN_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from deepalign.cli import analyze, attack, autorap, convert, demo, evaluate, judge, selfcheck, train, world
from deepalign.errors import DeepalignError

SUBCOMMANDS = (selfcheck, train, world, attack, autorap, judge, evaluate, analyze, demo, convert)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line refusal: ``PROG: argument --NAME: why (PROG --help for usage)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from deepalign import __version__

    parser = Parser(prog="deepalign", description="Deep safety alignment research on chat "
                                     "language models: kernels, training recipes, attacks, judges and analyses.")
    parser.add_argument("--version", action="version", version=f"deepalign {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(commands)
    return parser


def describe(error: BaseException) -> str:
    """One line for an expected error: the message, or for an OS error what failed on which path."""
    if isinstance(error, OSError) and error.strerror:
        where = " → ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        return f"{where}: {error.strerror}" if where else error.strerror
    if isinstance(error, UnicodeError):
        return f"text that is not valid Unicode ({error})"
    if isinstance(error, RecursionError):
        return "input nested too deeply to process"
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns its exit code (0 done, 1 a check failed, 2 a user error, 130 Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if os.environ.get("DEEPALIGN_TRACEBACK"):
            raise
        print(f"\ndeepalign {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (DeepalignError, ValueError, OSError, UnicodeError, RecursionError) as error:
        # deepalign's own errors, the library's argument checks (ValueError), files (OSError) and text.
        if os.environ.get("DEEPALIGN_TRACEBACK"):
            raise
        print(f"deepalign {args.command}: {describe(error)}", file=sys.stderr)
        return 2
