"""The stage pipeline on the synthetic world, at toy sizes: it runs end to end and resumes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

from deepalign.experiments.stages import (ATTACK_STAGES, STAGES, JobProgress, StageSettings, format_reports, run_stages,
                                         stage_plan)


def test_stages_run_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    # The pipeline's own CPU path: the PyTorch reference attention, not Triton's (slow) interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    settings = StageSettings(hidden_size=64, layers=2, pretrain_steps=12, align_steps=4, shallow_steps=5, attack_steps=3,
                             batch_size=8, progress=False)
    reports = run_stages(tmp_path, settings)
    assert list(reports) == list(STAGES)
    for report in reports.values():
        numbers = [report.first_token_refusal, report.benign_utility, report.harmful_rank_median,
                   report.harmful_rank_top20, *report.prefill_scores.values()]
        assert all(math.isfinite(x) for x in numbers)
        assert 0 <= report.first_token_refusal <= 1 and 0 <= report.harmful_rank_top20 <= 1
    saved = json.loads((tmp_path / "reports.json").read_text())
    assert set(saved["reports"]) == set(STAGES)
    metrics = {stage: (tmp_path / stage / "metrics.jsonl").read_text() for stage in STAGES}
    steps = {"base": 12, "shallow": 5}
    assert all(len(text.splitlines()) == steps.get(stage, 4) for stage, text in metrics.items())
    again = run_stages(tmp_path, settings)  # every stage is on disk: nothing is trained again
    assert {stage: (tmp_path / stage / "metrics.jsonl").read_text() for stage in STAGES} == metrics
    assert again == reports
    # With progress on, one line per step names the stage, n of N (everything is on disk: no bar).
    capsys.readouterr()
    from dataclasses import replace

    run_stages(tmp_path, replace(settings, progress=True))
    lines = [line for line in capsys.readouterr().err.splitlines() if "| job " in line]
    assert [line.split("]")[0] for line in lines] == [
        "[stage 1/5: base | job 1/5", "[stage 2/5: shallow | job 2/5", "[stage 3/5: da | job 3/5",
        "[stage 4/5: presto | job 4/5", "[stage 5/5: evaluate | job 5/5"]
    assert "on disk" in lines[0] and "evaluating 4 models" in lines[-1]
    # The fine-tuning attacks on the shallow model (plain SFT and the constrained objective).
    attacked = run_stages(tmp_path, settings, stages=STAGES + ATTACK_STAGES)
    assert list(attacked) == list(STAGES + ATTACK_STAGES)
    assert all(len((tmp_path / s / "metrics.jsonl").read_text().splitlines()) == settings.attack_steps
               for s in ATTACK_STAGES)
    assert "constrained" in (tmp_path / "ft-constrained" / "metrics.jsonl").read_text()
    table = format_reports(reports)
    assert all(stage in table for stage in STAGES) and "prefill10" in table

    # The combined analysis report over the stage models (deepalign analyze report).
    from deepalign.analysis.report import write_report
    from deepalign.experiments.analyses import stages_report_sections
    from deepalign.data.synthetic import SyntheticWorld

    sections = stages_report_sections(tmp_path, SyntheticWorld.load(tmp_path), ablate_steps=6)
    assert [s.title.split(":")[0] for s in sections][:4] == ["Attention to the prefill", "Attention received by each "
                                                             "token per layer", "Attention received by each token "
                                                             "per layer", "Per-position KL"]
    layers = sections[0].table
    assert [row[0] for row in layers] == list(range(settings.layers))
    assert all(0.0 <= float(value) <= 1.0 for row in layers for value in row[1:])
    knockout = next(s for s in sections if s.title.startswith("Attention knockout"))
    assert [row[0] for row in knockout.table] == ["base", "da", "presto"] and len(knockout.header) == 10  # + copied (v2)
    assert all(0.0 <= float(value) <= 1.0 for row in knockout.table for value in row[1:])
    ranks = next(s for s in sections if s.title.startswith("Ranks"))
    assert [row[0] for row in ranks.table] == list(STAGES) and len(ranks.header) == 7
    from deepalign.analysis.report import unexplained_columns

    assert {s.title: unexplained_columns(s) for s in sections} == {s.title: [] for s in sections}
    assert all(any(line.startswith("Seed: the models of seed 0 only") for line in s.text) for s in sections)
    ablation = sections[-1]
    top, control = ablation.figure.data[1], ablation.figure.data[2]  # the marked heads
    assert len(top.x) == len(control.x) == 4
    assert not set(zip(top.y, top.x)) & set(zip(control.y, control.x))
    path = write_report(tmp_path / "report.html", "stages", sections)
    assert path.stat().st_size > 1_000_000


def test_stages_refuse_an_output_made_with_other_settings(tmp_path):
    import json

    from deepalign.errors import SettingsMismatchError

    recorded = {k: v for k, v in asdict(StageSettings(seed=0)).items() if k != "progress"}
    (tmp_path / "stage_settings.json").write_text(json.dumps(recorded))
    with pytest.raises(SettingsMismatchError, match=r"other settings \(align_steps: 350 → 7; seed: 0 → 1\)"):
        run_stages(tmp_path, StageSettings(seed=1, align_steps=7, progress=False))


def test_the_job_progress_counts_every_step_of_the_whole_job():
    assert stage_plan(STAGES) == list(STAGES)
    assert stage_plan(("base", "da", "ft-sft", "cls")) == ["base", "shallow", "da", "ft-sft", "cls"]
    job = JobProgress(3, enabled=False)
    job.for_seed(7, 2, 3)
    assert job.step("stage 1/5: base", "training, 9 steps") == "[seed 7 (2/3), stage 1/5: base | job 1/3] training, 9 steps"
    assert job.step("x", "y").endswith("job 2/3] y")


def test_stages_on_world_v2_train_on_its_texts_and_refuse_a_world_change(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from deepalign.data.synthetic import SyntheticWorld
    from deepalign.data.synthetic_v2 import SyntheticWorldV2
    from deepalign.errors import SettingsMismatchError
    from deepalign.experiments.analyses import knockout_section
    from deepalign.experiments.corpus import world_corpus

    settings = StageSettings.for_world("v2", hidden_size=64, layers=2, pretrain_steps=6, align_steps=2, batch_size=4,
                                       progress=False)
    assert settings.align_replay > 0  # v2's alignment replays knowledge (KnowledgeReplay) on this path
    reports = run_stages(tmp_path, settings, stages=("base", "da"))
    world = SyntheticWorld.load(tmp_path)
    assert isinstance(world, SyntheticWorldV2) and json.loads((tmp_path / "world.json").read_text())["version"] == 2
    assert list(reports) == ["base", "da"] and all(math.isfinite(r.benign_utility) for r in reports.values())
    section = knockout_section([tmp_path / "base" / "final"], world_corpus(world))
    assert "every valid choice is correct" in " ".join(section.text) and len(section.table) == 1
    assert section.header[-3:] == [f"top 1 copied, {c}" for c in ("no knockout", "knockout in layers 1+",
                                                                    "knockout in every layer")]
    assert len(section.table[0]) == len(section.header)
    with pytest.raises(SettingsMismatchError, match=r"world: \"v2\" → \"v1\""):
        run_stages(tmp_path, StageSettings(world="v1", hidden_size=64, layers=2, pretrain_steps=6, align_steps=2,
                                           batch_size=4, progress=False), stages=("base", "da"))


def test_settings_per_world_and_replay_shares_are_checked():
    assert StageSettings.for_world("v2") == StageSettings() and StageSettings().world == "v2"
    v1 = StageSettings.for_world("v1", seed=3)  # the schedule of version 1's README tables
    assert (v1.world, v1.seed, v1.pretrain_steps, v1.align_steps, v1.shallow_replay, v1.align_replay) == \
        ("v1", 3, 1500, 150, 0.0, 0.0)
    assert StageSettings.for_world("v2", align_replay=0.0).align_replay == 0.0  # an override wins
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="align_replay must be in"):
            StageSettings(align_replay=bad)
    with pytest.raises(ValueError, match="world must be one of"):
        StageSettings.for_world("v3")
