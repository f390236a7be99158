"""The README's synthetic-world commands run as written, in order, on a quick stand-in world: the
world's untrained model copied into every stage folder stands in for ``runs/stages`` (which the README
makes with ``deepalign stages``, minutes of training), and each command gets options appended that only
shrink its work (argparse takes the last value), never options that change what it does. A README
command that fails, or names a file nothing makes, fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from deepalign.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
WORLD_PATHS = re.compile(r"runs/(world|stages|sft|presto|cls|autorap)")
# Appended per command: budgets only (steps, targets, tokens).
SHRINK = {
    ("train",): ["--steps", "2"],
    ("attack", "prefill"): ["--limit", "1", "--max-new-tokens", "4", "--lengths", "2"],
    ("attack", "rap"): ["--limit", "1", "--max-new-tokens", "4", "--max-steps", "4"],
    ("autorap", "data"): ["--limit", "2", "--max-new-tokens", "4"],
    ("autorap", "train"): ["--steps", "2"],
    ("evaluate", "over-refusal"): ["--limit", "2", "--max-new-tokens", "4"],
    ("analyze",): [],
    ("world",): [],
}


def readme_world_commands() -> list[list[str]]:
    """Every ``deepalign …`` line of a bash block that works on the synthetic world's files, in
    README order, continuation lines joined and comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["deepalign"] and WORLD_PATHS.search(line):
                commands.append(words[1:])
    return commands


def shrink(words: list[str]) -> list[str]:
    for prefix, extra in SHRINK.items():
        if tuple(words[:len(prefix)]) == prefix:
            return words + extra
    raise AssertionError(f"no budget options known for README command: deepalign {' '.join(words)}")


def test_the_readme_names_world_commands():
    names = {" ".join(w[:2]) for w in readme_world_commands()}
    assert {"world --output", "attack prefill", "attack rap", "autorap data", "train --recipe"} <= names


def test_every_readme_world_command_runs_in_order(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.chdir(tmp_path)
    assert main(["world", "--output", "runs/stages"]) == 0
    for stage in ("base", "shallow", "da", "presto"):
        shutil.copytree("runs/stages/model", f"runs/stages/{stage}/final")
    import time
    started = time.perf_counter()
    for words in readme_world_commands():
        print(f"{time.perf_counter() - started:7.1f} s  deepalign {' '.join(words)[:90]}", flush=True)
        code = main(shrink(words))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 0, f"deepalign {' '.join(words)}: exit {code}: {err[-1:] if err else ''}"
