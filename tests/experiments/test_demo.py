"""``deepalign demo --quick`` end to end: every row of the table is filled with finite numbers."""

from __future__ import annotations

import json
import math

from deepalign.cli import main
from deepalign.experiments.demo import METRICS, MODELS, DemoSettings, default_output


def test_quick_demo_fills_every_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU path (the PyTorch reference), as a user runs it
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for model in MODELS:
        line = next(l for l in out.splitlines() if l.startswith(model + " ") and "±" in l)
        numbers = [float(x) for x in line.split()[1:] if x != "±"]
        assert len(numbers) == 2 * len(METRICS) and all(math.isfinite(x) for x in numbers)
    accuracy = next(l for l in out.splitlines() if l.startswith("cls: held-out request classification accuracy"))
    assert 0 <= float(accuracy.split()[-3]) <= 1
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["model"] for r in records) == sorted(MODELS)
    assert all(0 <= r[m] <= 1 for r in records for m in METRICS)
    report = (tmp_path / "report.html").read_text()
    assert "Attacks and utility" in report and "Per-position KL" in report
    # A rerun resumes: nothing is trained or attacked again.
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(MODELS)
    # The full demo never reuses the quick demo's models: into the same folder it is refused, by name.
    assert main(["demo", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"deepalign demo: {tmp_path} was made with other settings (") and "quick: true → false" in err
    assert "default is runs/demo" in err


def test_quick_and_full_demo_default_to_different_folders():
    assert default_output(True) != default_output(False)
    assert DemoSettings(quick=True).defining() != DemoSettings(quick=False).defining()
    assert DemoSettings(seeds=(0,)).defining() == DemoSettings(seeds=(0, 1, 2)).defining()  # seeds add rows
