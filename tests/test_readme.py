"""The README's Python snippets under "Using the kernels" run as written (on a CPU: the PyTorch
references, as for a user; the kernels' interpreter runs are tested elsewhere), so that the front door
cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def kernel_snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Using the kernels")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_there_are_snippets_to_run():
    assert len(kernel_snippets()) >= 3


@pytest.mark.parametrize("index", range(3))
def test_each_kernel_snippet_runs_as_written(index, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # dispatch reads it per call: a user's CPU path
    exec(compile(kernel_snippets()[index], f"README.md snippet {index + 1}", "exec"), {})
