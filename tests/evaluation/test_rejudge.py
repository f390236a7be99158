"""Re-judging a result log: unreadable judge answers are recorded unscored, named and counted."""

from __future__ import annotations

from deepalign.attacks.results import format_table, summarize
from deepalign.evaluation.rejudge import rejudge
from deepalign.io import JsonlLog


def test_an_unreadable_answer_is_recorded_named_and_counted(tmp_path, capsys):
    source = JsonlLog(tmp_path / "results.jsonl")
    for key, output in (("a", "fine"), ("b", "garbled"), ("c", "fine")):
        source.append({"key": key, "id": key, "prompt": "q", "output": output, "setting": "s", "category": "x"})

    def judge(target, output):
        if output == "garbled":
            return {"score": None, "parsed": False, "judge_answer": "no scores here"}
        return {"score": 1.0, "parsed": True}

    records = rejudge(source, JsonlLog(tmp_path / "judged.jsonl"), judge, "rubric", progress=False)
    assert [r["score"] for r in records] == [1.0, None, 1.0]
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "b: the judge's answer could not be read" in said and "'no scores here'" in said
    rows = summarize(records, "score", ("setting",))
    assert rows[0]["score_mean"] == 1.0 and rows[0]["items"] == 2 and rows[0]["unparsed"] == 1
    assert "unparsed" in format_table(rows, ("setting",), "score")
    # A rerun judges nothing again (the unscored record is kept, not retried forever).
    calls = []
    rejudge(source, JsonlLog(tmp_path / "judged.jsonl"), lambda t, o: calls.append(o) or {"score": 0.0}, "rubric",
            progress=False)
    assert calls == []


def test_copyright_behaviours_are_counted_apart():
    records = [{"setting": "s", "score": 1.0}, {"setting": "s", "score": None, "copyright": True},
               {"setting": "s", "score": None}]
    (row,) = summarize(records, "score", ("setting",))
    assert (row["items"], row["unparsed"], row["copyright"]) == (1, 1, 1)
    table = format_table([row], ("setting",), "score")
    assert "unparsed" in table and "copyright" in table
