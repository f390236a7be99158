"""Utility scorers against hand-computed values, the evaluation loop, and the evaluate command end to end."""

from __future__ import annotations

import json

import pytest

from deepalign.cli import main
from deepalign.data.utility_files import Dialogue, MathProblem, read_gsm8k, read_samsum
from deepalign.evaluation import utility
from deepalign.io import JsonlLog
from deepalign.models.generation import GREEDY


# ROUGE-1 by hand: rouge-score's tokens are lower-case runs of [a-z0-9], Porter-stemmed when longer than
# 3 characters; m = clipped unigram overlap; P = m/|prediction|, R = m/|reference|, F = 2PR/(P+R).
@pytest.mark.parametrize("reference, prediction, precision, recall", [
    # ref [the, cat, sat, on, the, mat], pred [the, cat, sat]: m = 3
    ("The cat sat on the mat.", "the cat sat", 3 / 3, 3 / 6),
    # stemming: dogs -> dog, running -> run, runs -> run; "are" and "a" stay: m = 2 of 3 each way
    ("Dogs are running", "a dog runs", 2 / 3, 2 / 3),
    # clipping: "red" twice in the prediction, once in the reference counts once
    ("red red blue", "red", 1 / 1, 1 / 3),
    ("Red, RED! blue", "red red red green", 2 / 4, 2 / 3),
    ("hello world", "good night", 0.0, 0.0),
])
def test_rouge1_matches_the_definition(reference, prediction, precision, recall):
    score = utility.rouge1(reference, prediction)
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    assert score.precision == pytest.approx(precision)
    assert score.recall == pytest.approx(recall)
    assert score.fmeasure == pytest.approx(f)


def test_rouge1_of_an_empty_answer_is_zero():
    assert utility.rouge1("Ben feeds the cat.", "") == utility.Rouge(0.0, 0.0, 0.0)


@pytest.mark.parametrize("output, reference, extract, correct", [
    ("6 * 8 = 48, 48 - 30 = 18\n#### 18", 18.0, "qi", True),
    ("#### 18.0", 18.0, "qi", True),          # compared as floats
    ("#### 1,200", 1200.0, "qi", True),
    ("The answer is 18.", 18.0, "qi", False),  # no '#### ': [invalid], a miss
    ("#### 17\nno wait, 18", 18.0, "qi", False),
    ("The answer is 18.", 18.0, "last-number", True),
    ("I had 3, then 1,250 and finally -4.5", -4.5, "last-number", True),
    ("It is 1,250.", 1250.0, "last-number", True),
    ("no digits at all", 0.0, "last-number", False),
])
def test_gsm8k_correctness(output, reference, extract, correct):
    assert utility.gsm8k_correct(output, reference, extract) is correct


def test_prompts_are_qi_et_al_s():
    assert utility.gsm8k_prompt(MathProblem("1", "How many?", "#### 2", 2.0)) == "How many?"
    assert utility.samsum_prompt(Dialogue("1", "A: hi\nB: hey", "x")) == "Summarize this dialog:\nA: hi\nB: hey"
    assert utility.GSM8K_SYSTEM == "You are a helpful assistant."
    assert utility.SAMSUM_SYSTEM == "You are a helpful assistant for dialog summarization."
    s = utility.QI_UTILITY_SAMPLING
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (0.9, 0.6, 50, 1024)


def test_the_loop_scores_logs_and_resumes(tmp_path, monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompts, prefills, sampling, *, seed=None, system=None, max_new_tokens=None):
        calls.append((list(prompts), system))
        return ["so #### 18" if "baker" in p else "I think 7" for p in prompts]

    monkeypatch.setattr(utility, "generate_after_prefill", fake_generate)
    rows = read_gsm8k("examples/gsm8k_sample.jsonl")
    log = JsonlLog(tmp_path / "g.jsonl")
    records = utility.evaluate_task(None, None, rows[:4], log, utility.gsm8k_task(), batch_size=3, progress=False)
    assert [r["correct"] for r in records] == [True, False, False, False]
    assert [len(p) for p, _ in calls] == [3, 1] and calls[0][1] == utility.GSM8K_SYSTEM
    assert utility.gsm8k_summary(records) == {"n": 4, "correct": 1, "accuracy": 0.25, "no_answer": 3}
    records = utility.evaluate_task(None, None, rows, JsonlLog(tmp_path / "g.jsonl"), utility.gsm8k_task(),
                                    progress=False, system=None)
    assert len(records) == 6 and [len(p) for p, _ in calls[2:]] == [2] and calls[2][1] is None  # only the rest
    samsum = read_samsum("examples/samsum_sample.jsonl")
    monkeypatch.setattr(utility, "generate_after_prefill", lambda m, t, prompts, *a, **k: [
        "Ben will feed the cat." if "cat" in p else "" for p in prompts])
    records = utility.evaluate_task(None, None, samsum, JsonlLog(tmp_path / "s.jsonl"), utility.samsum_task(),
                                    progress=False)
    expected = utility.rouge1(samsum[2].summary, "Ben will feed the cat.").fmeasure
    assert [r["rouge1_f"] for r in records] == [0.0, 0.0, pytest.approx(expected), 0.0]
    assert utility.samsum_summary(records)["rouge1_f"] == pytest.approx(expected / 4)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, world):
    from tests.helpers import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "model"
    return save_tiny_model(folder, world.tokenizer(), seed=0, layers=1)


def test_evaluate_gsm8k_and_samsum_from_the_command_line(tiny_model, tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    args = ["evaluate", "gsm8k", "--model", str(tiny_model), "--data", "examples/gsm8k_sample.jsonl",
            "--output", str(out), "--max-new-tokens", "4", "--batch-size", "2"]
    assert main(args + ["--limit", "3"]) == 0
    assert "GSM8K accuracy: 0/3 = 0.000" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reference"] for r in records] == [18.0, 80.0, 15.0] and all(r["task"] == "gsm8k" for r in records)
    assert main(args) == 0  # a larger --limit extends the log; finished rows are not redone
    assert "0/6" in capsys.readouterr().out and len(out.read_text().splitlines()) == 6
    assert main(args + ["--max-new-tokens", "5"]) == 2  # another budget is another run
    assert "was made with other settings (max_new_tokens: 4 → 5)" in capsys.readouterr().err
    assert main(["evaluate", "samsum", "--model", str(tiny_model), "--data", "examples/samsum_sample.jsonl",
                 "--output", str(tmp_path / "s.jsonl"), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert "SAMSum ROUGE-1 (rouge-score, stemmed): F " in capsys.readouterr().out


def test_evaluate_refuses_bad_files_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "answer": "#### 4"}\n{"question": "R", "answer": "five"}\n')
    (tmp_path / "m").mkdir()
    assert main(["evaluate", "gsm8k", "--model", str(tmp_path / "m"), "--data", str(bad), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:2: the answer has no final number after '#### '" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl.settings.json").exists()
