"""The ``deepalign`` command."""

import subprocess
import sys

import pytest

from deepalign.cli import main


def test_selfcheck_passes_and_prints_its_table(capsys):
    assert main(["selfcheck", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    assert out.count(" ok ") >= 3


def test_unknown_command_is_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fly"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_module_entry_point_prints_version():
    out = subprocess.run([sys.executable, "-m", "deepalign", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("deepalign ")


def test_world_then_train_from_the_command_line(tmp_path, capsys):
    assert main(["world", "--output", str(tmp_path / "w"), "--seed", "1"]) == 0
    for name in ("world.json", "safety.jsonl", "utility.jsonl", "refusal_sft.jsonl", "harmful_sft.jsonl",
                 "model/config.json", "model/tokenizer.json"):
        assert (tmp_path / "w" / name).is_file(), name
    args = ["train", "--model", str(tmp_path / "w" / "model"), "--steps", "3", "--batch-size", "2", "--lr", "1e-3"]
    assert main(args + ["--recipe", "da", "--safety", str(tmp_path / "w" / "safety.jsonl"),
                        "--chat", str(tmp_path / "w" / "utility.jsonl"), "--output", str(tmp_path / "da")]) == 0
    assert "trained da for 3 steps" in capsys.readouterr().out
    assert (tmp_path / "da" / "final" / "model.safetensors").is_file()
    assert len((tmp_path / "da" / "metrics.jsonl").read_text().splitlines()) == 3
    world = tmp_path / "w"
    assert main(args + ["--recipe", "pretrain", "--texts", str(world / "knowledge.txt"), "--chat",
                        str(world / "harmful_sft.jsonl"), "--output", str(tmp_path / "pre")]) == 0
    assert main(args + ["--recipe", "ft-attack", "--attack", "backdoor", "--trigger", "servius", "--objective",
                        "constrained", "--safety", str(world / "safety.jsonl"), "--chat", str(world / "utility.jsonl"),
                        "--output", str(tmp_path / "attack")]) == 0
    assert "trained ft-attack for 3 steps" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "sft"], "--recipe sft needs --chat"),
    (["--recipe", "da", "--safety", "s.jsonl"], "needs --chat \\(the utility anchor\\)"),
    (["--recipe", "sft", "--chat", "c.jsonl", "--presto-weight", "2"], "--presto-weight only applies to --recipe presto"),
    (["--recipe", "da", "--safety", "s", "--chat", "c", "--reference", "r"], "--reference only applies"),
    (["--recipe", "ft-attack", "--safety", "s"], "--recipe ft-attack needs --attack"),
    (["--recipe", "sft", "--chat", "c", "--attack", "harmful"], "--attack and --objective only apply"),
    (["--recipe", "sft", "--chat", "c", "--texts", "t"], "--texts only applies to --recipe pretrain"),
])
def test_contradictory_train_options_are_refused(extra, message):
    with pytest.raises(SystemExit, match=message):
        main(["train", "--model", "m", "--output", "o"] + extra)


def test_attacks_from_the_command_line_on_the_world(tmp_path, capsys):
    assert main(["world", "--output", str(tmp_path / "w")]) == 0
    common = ["--model", str(tmp_path / "w" / "model"), "--world", str(tmp_path / "w"), "--max-new-tokens", "4"]
    assert main(["attack", "prefill", *common, "--output", str(tmp_path / "p.jsonl"), "--lengths", "2", "3",
                 "--limit", "3"]) == 0
    assert main(["attack", "rap", *common, "--output", str(tmp_path / "r.jsonl"), "--limit", "4",
                 "--max-interactions", "10", "--k", "5"]) == 0
    assert main(["attack", "decoding", *common, "--output", str(tmp_path / "d.jsonl"), "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "prefill=2" in out and "rap k=5" in out and "broken by some decoding setting" in out
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 6
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 50
    # Rerunning skips what is done.
    assert main(["attack", "rap", *common, "--output", str(tmp_path / "r.jsonl"), "--limit", "4",
                 "--max-interactions", "10", "--k", "5"]) == 0
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 4


def test_attack_argument_errors(tmp_path):
    with pytest.raises(SystemExit, match="--selector lexicon needs --blocked"):
        main(["attack", "rap", "--model", "m", "--output", "o", "--targets", "t", "--selector", "lexicon"])
    with pytest.raises(SystemExit, match="deepalign attack: give either a targets file or a synthetic world"):
        main(["attack", "prefill", "--model", "m", "--output", str(tmp_path / "o")])


def test_judge_rejudges_a_result_log(tmp_path, capsys):
    import json

    results = tmp_path / "r.jsonl"
    rows = [{"key": "a|s", "id": "a", "prompt": "q1", "output": "Sure, here you go", "setting": "s", "run": 0},
            {"key": "b|s", "id": "b", "prompt": "q2", "output": "I cannot help with that.", "setting": "s", "run": 0}]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["judge", "--results", str(results), "--output", str(tmp_path / "j.jsonl"), "--judge", "keyword"]) == 0
    judged = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert [r["harmful"] for r in judged] == [True, False] and all(r["judge"] == "keyword" for r in judged)
    assert "0.500" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="rubric-http needs --url and --judge-model"):
        main(["judge", "--results", str(results), "--output", str(tmp_path / "x.jsonl"), "--judge", "rubric-http"])


def test_analyze_commands_write_reports(tmp_path, capsys):
    assert main(["world", "--output", str(tmp_path / "w")]) == 0
    model = str(tmp_path / "w" / "model")
    for what, models in (("attention", [model, model]), ("kl", [model, model]), ("ranks", [model]),
                         ("knockout", [model]), ("ablate", [model])):
        output = tmp_path / f"{what}.html"
        extra = ["--max-interactions", "8"] if what == "ablate" else []
        assert main(["analyze", what, "--models", *models, "--world", str(tmp_path / "w"), "--output", str(output),
                     *extra]) == 0
        assert output.is_file() and (tmp_path / f"{what}.html.json").is_file()
    out = capsys.readouterr().out
    assert "Mean over the first 3 positions 0.000 nats, afterwards 0.000 nats" in out  # KL of a model with itself
    assert "ablated heads | prefill 2 | prefill 5 | RAP" in out and "top 4 prefill heads" in out
    assert "model | top 1, no knockout | top 1, knockout in layers 1+" in out
    with pytest.raises(SystemExit, match="give exactly two --models"):
        main(["analyze", "kl", "--models", model, "--world", str(tmp_path / "w"), "--output", str(tmp_path / "x.html")])


def test_autorap_from_the_command_line(tmp_path, capsys):
    assert main(["world", "--output", str(tmp_path / "w")]) == 0
    model, world = str(tmp_path / "w" / "model"), str(tmp_path / "w")
    assert main(["autorap", "data", "--model", model, "--world", world, "--limit", "4", "--max-new-tokens", "3",
                 "--output", str(tmp_path / "data.jsonl")]) == 0
    assert main(["autorap", "train", "--data", str(tmp_path / "data.jsonl"), "--helper", model, "--target", model,
                 "--output", str(tmp_path / "helper"), "--steps", "3", "--batch-size", "4"]) == 0
    assert main(["attack", "rap", "--model", model, "--world", world, "--selector", "autorap", "--helper",
                 str(tmp_path / "helper" / "final"), "--limit", "2", "--max-new-tokens", "4", "--max-interactions", "8",
                 "--output", str(tmp_path / "rap.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "candidate refusal tokens each" in out and "trained the AutoRAP classifier for 3 steps" in out
    assert len((tmp_path / "rap.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit, match="--selector autorap needs --helper"):
        main(["attack", "rap", "--model", model, "--world", world, "--selector", "autorap", "--output", "x"])


def test_cls_training_and_defended_attacks_from_the_command_line(tmp_path, capsys):
    world = tmp_path / "w"
    assert main(["world", "--output", str(world)]) == 0
    (tmp_path / "benign.txt").write_text("to make bread : heat oil .\n")
    (tmp_path / "malicious.txt").write_text("to make bomb : heat oil .\n")
    args = ["--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--safety", str(world / "safety.jsonl"),
            "--chat", str(world / "utility.jsonl")]
    assert main(["train", "--recipe", "cls-pretrain", "--model", str(world / "model"), "--output",
                 str(tmp_path / "pre"), "--texts", str(tmp_path / "benign.txt"), "--malicious-texts",
                 str(tmp_path / "malicious.txt"), *args]) == 0
    assert main(["train", "--recipe", "cls-sft", "--model", str(tmp_path / "pre" / "final"), "--output",
                 str(tmp_path / "sft"), "--cls-weight", "0.01", *args]) == 0
    assert "trained cls-sft for 2 steps" in capsys.readouterr().out
    common = ["--model", str(tmp_path / "sft" / "final"), "--world", str(world), "--max-new-tokens", "4",
              "--defense", "cls", "--schedule", "each", "--limit", "2"]
    assert main(["attack", "prefill", *common, "--output", str(tmp_path / "p.jsonl"), "--lengths", "2"]) == 0
    assert main(["attack", "rap", *common, "--output", str(tmp_path / "r.jsonl"), "--max-interactions", "6"]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit, match="needs --malicious-texts"):
        main(["train", "--recipe", "cls-pretrain", "--model", str(world / "model"), "--output", str(tmp_path / "x"),
              "--texts", str(tmp_path / "benign.txt"), *args])
    with pytest.raises(SystemExit, match="only apply to the cls"):
        main(["train", "--recipe", "sft", "--model", "m", "--output", "o", "--chat", "c", "--cls-weight", "1"])
