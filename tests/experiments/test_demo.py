"""``deepalign demo --quick`` end to end: every row of the table is filled with finite numbers."""

from __future__ import annotations

import html
import json
import math

from deepalign.cli import main
from deepalign.analysis.report import unexplained_columns
from deepalign.experiments.demo import (CLS_ACCURACY, METRICS, MODELS, SMOKE_RUN, DemoSettings, default_output,
                                        demo_job, format_table, summary_section)


def test_quick_demo_fills_every_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU path (the PyTorch reference), as a user runs it
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith(SMOKE_RUN)  # the printed table says it is a smoke run
    # One progress line per step of the whole job, numbered n/N: stages, attacks, report.
    total = demo_job(DemoSettings(seeds=(0,))).total
    progress = [line for line in captured.err.splitlines() if "| job " in line]
    assert [line.split("| job ")[1].split("]")[0] for line in progress] == [f"{n}/{total}" for n in range(1, total + 1)]
    assert progress[1].startswith("[seed 0 (1/1), stage 2/8: shallow | job 2/")
    assert any("attacks 1/7: base" in line for line in progress) and "report: analyses of seed 0" in progress[-1]
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
    assert f"<p class='banner'>{html.escape(SMOKE_RUN)}</p>" in report and "(SMOKE RUN, --quick)" in report
    assert "The analyses below are of the models of seed 0 only." in report
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


def fake_rows(seeds: int) -> list[dict]:
    rows = [{"model": name, "seeds": seeds, **{m: (0.5, 0.1) for m in METRICS}} for name in MODELS]
    rows[MODELS.index("cls")][CLS_ACCURACY] = (0.9, 0.0)
    return rows


def test_the_smoke_run_label_is_on_quick_output_only_and_every_column_is_explained():
    assert format_table(fake_rows(1), quick=True).startswith(SMOKE_RUN)
    full = format_table(fake_rows(3))
    assert "SMOKE" not in full and full.startswith("model")
    quick = summary_section(fake_rows(1), [0], quick=True, analysed=0)
    assert quick.banner == SMOKE_RUN and "seed 0 only" in quick.title
    study = summary_section(fake_rows(3), [0, 1, 2], analysed=0)
    assert study.banner == "" and "3 seeds (0, 1, 2)" in study.title
    assert any("analyses below are of the models of seed 0 only" in line for line in study.text)
    assert unexplained_columns(study) == [] and CLS_ACCURACY in dict(study.metrics)
