"""``deepalign demo --quick`` end to end: every row of the table is filled with finite numbers (the
[CLS] model's GCG and embedding cells with n/a), old result folders gain the added columns on a resume."""

from __future__ import annotations

import html
import json
import math

from deepalign.cli import main
from deepalign.analysis.report import unexplained_columns
from deepalign.experiments.demo import (ADDED_METRICS, BASE_METRICS, CLS_ACCURACY, CLS_NA, GRADIENT_ATTACKS, METRICS,
                                        MODELS, OVER_REFUSAL, SMOKE_RUN, DemoSettings, added_columns, default_output,
                                        demo_job, format_table, record_key, summary_section)


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
    header = next(l for l in out.splitlines() if l.startswith("model "))
    assert header.split()[-len(ADDED_METRICS):] == list(ADDED_METRICS)
    for model in MODELS:
        line = next(l for l in out.splitlines() if l.startswith(model + " ") and "±" in l)
        numbers = [float(x) for x in line.split()[1:] if x not in ("±", "n/a")]
        missing = len(GRADIENT_ATTACKS) if model == "cls" else 0  # n/a behind the [CLS] defense
        assert line.split().count("n/a") == missing
        assert len(numbers) == 2 * (len(METRICS) - missing) and all(math.isfinite(x) for x in numbers)
    accuracy = next(l for l in out.splitlines() if l.startswith("cls: held-out request classification accuracy"))
    assert 0 <= float(accuracy.split()[-3]) <= 1
    assert "lower is better" in out and CLS_NA in out
    assert out.count("seed 0, shallow: GCG ") == 1  # GCG against no attack on the shallow model, per seed
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(r["key"] for r in records) == sorted(
        [record_key(0, m) for m in MODELS] + [record_key(0, m, c) for m in MODELS for c in added_columns(m)])
    assert all(0 <= r[m] <= 1 for r in records if "column" not in r for m in BASE_METRICS)
    assert all(0 <= r[r["column"]] <= 1 for r in records if "column" in r)
    gcg = next(r for r in records if r["key"] == record_key(0, "shallow", "GCG"))
    assert gcg["requests"] == DemoSettings(quick=True).optimisation_targets("GCG") == len(gcg["details"])
    assert 0 <= gcg["no attack (same requests)"] <= 1 and gcg["setting"].startswith("gcg steps=")
    over = next(r for r in records if r["key"] == record_key(0, "cls", OVER_REFUSAL))
    assert over["safe prompts"] == over["unsafe prompts"] > 0 and 0 <= over["refused unsafe"] <= 1
    report = (tmp_path / "report.html").read_text()
    assert "Attacks and utility" in report and "Per-position KL" in report
    assert f"<p class='banner'>{html.escape(SMOKE_RUN)}</p>" in report and "(SMOKE RUN, --quick)" in report
    assert "The analyses below are of the models of seed 0 only." in report and "GCG against no attack" in report
    # A folder made before the added columns (no attack_settings.json, no rows for them) resumes: its rows
    # stay as they are, the added columns get their rows; nothing else is trained or attacked again.
    old = [line for line, r in zip(lines, records) if not (r["model"] == "shallow" and "column" in r)]
    (tmp_path / "results.jsonl").write_text("".join(line + "\n" for line in old))
    (tmp_path / "attack_settings.json").unlink()
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    resumed = (tmp_path / "results.jsonl").read_text().splitlines()
    assert resumed[:len(old)] == old and len(resumed) == len(lines)
    assert sorted(json.loads(line)["column"] for line in resumed[len(old):]) == sorted(ADDED_METRICS)
    # Other budgets for the added columns are refused, by name.
    settings = json.loads((tmp_path / "attack_settings.json").read_text())
    settings["gcg"]["num_steps"] += 1
    (tmp_path / "attack_settings.json").write_text(json.dumps(settings))
    capsys.readouterr()
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 2
    assert "gcg: " in capsys.readouterr().err
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
    rows[MODELS.index("cls")].update({m: None for m in GRADIENT_ATTACKS})
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
    meanings = dict(study.metrics)
    assert "20 steps × search width 128 × top-k 64" in meanings["GCG"] and "LOWER is better" in meanings[OVER_REFUSAL]
    assert "3 steps × search width 16" in dict(quick.metrics)["GCG"] and "{" not in "".join(meanings.values())
    assert meanings["n/a"] == CLS_NA
    cls = next(row for row in study.table if row[0] == "cls")
    assert [cls[1 + METRICS.index(m)] for m in GRADIENT_ATTACKS] == ["n/a", "n/a"]
    assert "n/a" in next(line for line in full.splitlines() if line.startswith("cls "))
