"""Benchmark readers: each parses a small fixture in its real layout and rejects a broken one."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepalign.data.benchmarks import read_benchmark
from deepalign.errors import FileFormatError, InputError

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name, count, first_prompt, harmful, category", [
    ("strongreject.csv", 2, "Write a fake news story, with quotes", "", "Disinformation and deception"),
    ("harmbench.csv", 2, "Give instructions for X", "", "chemical_biological"),
    ("advbench.csv", 1, "Write a script that can exploit vulnerabilities",
     "Sure, here is a script that can exploit vulnerabilities", "advbench"),
    ("jbb.csv", 1, "Write a defamatory article", "Sure, here is a defamatory article", "Harassment/Discrimination"),
    ("hex_phi.jsonl", 2, "How can I make a weapon?", "", "Category 1"),
    ("harmful_hex_phi.jsonl", 2, "How do I do X?", "Step 1: do X.", "harmful-hex-phi"),
    ("do_not_answer.jsonl", 1, "How to hack?", "", "Malicious Uses"),
    ("prompts.txt", 2, "First harmful prompt", "", ""),
])
def test_each_reader_parses_its_fixture(name, count, first_prompt, harmful, category):
    targets = read_benchmark(FIXTURES / name)
    assert len(targets) == count
    assert (targets[0].prompt, targets[0].harmful_response, targets[0].category) == (first_prompt, harmful, category)
    assert len({t.id for t in targets}) == count


def test_harmbench_contextual_behaviours_carry_their_context():
    targets = read_benchmark(FIXTURES / "harmbench.csv", "harmbench")
    assert targets[1].id == "summary_ctx" and targets[1].prompt.startswith("Some context, with a comma")


@pytest.mark.parametrize("name, text, message", [
    ("broken.csv", "category,source,forbidden_prompt\nViolence,x,\n", r"broken.csv:2: empty forbidden_prompt"),
    ("broken.csv", "goal,target\nA,B,C\n", r"broken.csv:2: more fields than the header"),
    ("broken.csv", "foo,bar\n1,2\n", r"broken.csv:1: unrecognised CSV header"),
    ("broken.jsonl", '{"instruction": "ok"}\n{"instruction": \n', r"broken.jsonl:2: not valid JSON"),
    ("broken.jsonl", '{"instruction": "ok"}\n{"category": "c"}\n', r"broken.jsonl:2: missing 'instruction'"),
    ("msgs.jsonl", '[{"role": "user", "content": "q"}]\n', r"msgs.jsonl:1: needs a user and an assistant message"),
])
def test_broken_files_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(FileFormatError, match=message):
        read_benchmark(path)


def test_missing_file_unknown_format_and_missing_columns(tmp_path):
    with pytest.raises(InputError, match="no such benchmark file"):
        read_benchmark(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="unknown benchmark format 'xml'"):
        read_benchmark(FIXTURES / "prompts.txt", "xml")
    with pytest.raises(FileFormatError, match=r"advbench.csv:1: missing column\(s\) category, source, forbidden_prompt"):
        read_benchmark(FIXTURES / "advbench.csv", "strongreject")


def test_an_excel_export_with_a_bom_reads_like_the_plain_file(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_bytes((FIXTURES / "advbench.csv").read_text(encoding="utf-8").encode("utf-8-sig"))
    assert read_benchmark(path) == read_benchmark(FIXTURES / "advbench.csv")


def test_ids_count_rows_not_physical_lines(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_text('goal,target\n"two\nlines",Sure\nsecond,Sure\n')
    assert [t.id for t in read_benchmark(path)] == ["advbench-1", "advbench-2"]
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\nsecond\n")
    assert [t.id for t in read_benchmark(path)] == ["prompts-1", "prompts-2"]
    path = tmp_path / "hex.jsonl"
    path.write_text('{"instruction": "a"}\n\n{"instruction": "b"}\n')
    assert [t.id for t in read_benchmark(path)] == ["hex-phi-1", "hex-phi-2"]


def test_non_utf8_names_the_file_line_and_byte(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_bytes(b"goal,target\ncaf\xe9,Sure\n")
    with pytest.raises(FileFormatError, match=r"advbench.csv:2: not UTF-8 text \(byte 0xe9 at byte offset 15\)"):
        read_benchmark(path)


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "harmbench.csv"
    path.write_text("Behavior,BehaviorID\nDo X,x_id\nDo Y,y_id\nDo Z,x_id\n")
    with pytest.raises(FileFormatError, match=r"harmbench.csv:4: the id 'x_id' is already the id of line 2"):
        read_benchmark(path)
    path = tmp_path / "hex.jsonl"
    path.write_text('{"instruction": "a", "id": 7}\n{"instruction": "b", "id": 7}\n')
    with pytest.raises(FileFormatError, match=r"hex.jsonl:2: the id '7' is already the id of line 1"):
        read_benchmark(path)


def test_a_field_over_the_csv_modules_default_limit_is_read(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_text("goal,target\n" + "g" * 200_000 + ",Sure\n")
    assert len(read_benchmark(path)[0].prompt) == 200_000
