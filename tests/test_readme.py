"""The README's Python snippets under "Using the kernels" run as written, as a user runs them on a CPU
(the PyTorch references; the kernels' interpreter runs are tested elsewhere), so that the front door
cannot drift from the code. Each runs in its own Python process without ``TRITON_INTERPRET``, which
Triton reads once per process and the other tests need set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def kernel_snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Using the kernels")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_there_are_snippets_to_run():
    assert len(kernel_snippets()) >= 3


@pytest.mark.parametrize("index", range(3))
def test_each_kernel_snippet_runs_as_written(index):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", kernel_snippets()[index]], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README snippet {index + 1} failed:\n{done.stderr[-3000:]}"
