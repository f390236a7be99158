"""deepalign.io: logs that lose and double nothing under concurrent processes, torn tails, readers
that name the place of every bad byte, atomic writes that leave no temporary file."""

from __future__ import annotations

import json
import multiprocessing
import warnings

import pytest

from deepalign.errors import FileFormatError, InputError
from deepalign.io import (JsonlLog, TornTailWarning, atomic_directory, atomic_write_text, iter_jsonl, read_csv,
                          read_json, read_text)

N_RECORDS = 300


def _writer(path: str, name: str, count: int) -> None:
    log = JsonlLog(path)
    for i in range(count):
        log.append({"key": f"{name}-{i}", "i": i, "pad": "x" * (i % 50)})


def _same_keys_writer(path: str, count: int) -> None:
    log = JsonlLog(path)
    for i in range(count):
        log.append({"key": f"item-{i}", "by": multiprocessing.current_process().name})


def _start(target, *args) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


def test_a_reader_looping_beside_a_writer_loses_nothing(tmp_path):
    path = tmp_path / "live.jsonl"
    writer = _start(_writer, str(path), "w", N_RECORDS)
    seen_max = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TornTailWarning)  # a line being written is skipped, never rewritten
        while writer.is_alive():
            seen = len(JsonlLog(path))  # what `deepalign judge --results live.jsonl` does
            assert seen >= seen_max  # never fewer records than an earlier read: nothing was removed
            seen_max = seen
    writer.join()
    assert writer.exitcode == 0
    records = JsonlLog(path).records()
    assert [r["i"] for r in records] == list(range(N_RECORDS))
    assert len(path.read_text().splitlines()) == N_RECORDS


def test_two_writers_of_different_items_interleave_whole_lines(tmp_path):
    path = tmp_path / "two.jsonl"
    first, second = _start(_writer, str(path), "a", N_RECORDS), _start(_writer, str(path), "b", N_RECORDS)
    first.join(), second.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * N_RECORDS
    keys = [json.loads(line)["key"] for line in lines]
    assert sorted(keys) == sorted([f"a-{i}" for i in range(N_RECORDS)] + [f"b-{i}" for i in range(N_RECORDS)])


def test_two_writers_of_the_same_items_write_each_key_once(tmp_path):
    path = tmp_path / "same.jsonl"
    first, second = _start(_same_keys_writer, str(path), N_RECORDS), _start(_same_keys_writer, str(path), N_RECORDS)
    first.join(), second.join()
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert sorted(keys) == sorted(f"item-{i}" for i in range(N_RECORDS))  # no key doubled, none lost


def test_a_torn_tail_is_skipped_by_readers_and_cut_by_the_next_append(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"key": "a", "v": 1}\n{"key": "b", "v": 2}\n{"key": "c", "v"')
    before = path.read_bytes()
    with pytest.warns(TornTailWarning, match=r"log.jsonl:3"):
        log = JsonlLog(path)
    assert [r["key"] for r in log.records()] == ["a", "b"]
    assert path.read_bytes() == before  # reading never rewrites
    assert log.append({"key": "c", "v": 3})
    assert path.read_text() == '{"key": "a", "v": 1}\n{"key": "b", "v": 2}\n{"key": "c", "v": 3}\n'


def test_a_torn_tail_that_is_the_only_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"key": "a"')
    with pytest.warns(TornTailWarning):
        log = JsonlLog(path)
    assert len(log) == 0
    log.append({"key": "a"})
    assert path.read_text() == '{"key": "a"}\n'


def test_a_broken_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(FileFormatError, match=r"log.jsonl:2: not valid JSON"):
        JsonlLog(path)


def test_duplicate_keys_in_a_file_keep_the_first_record(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"key": "a", "v": 1}\n{"key": "a", "v": 2}\n{"key": "b", "v": 3}\n')
    log = JsonlLog(path)
    assert [(r["key"], r["v"]) for r in log.records()] == [("a", 1), ("b", 3)]
    assert log.duplicates == 1
    assert not log.append({"key": "a", "v": 4})
    assert path.read_text().count("\n") == 3


def test_append_sees_records_another_handle_wrote(tmp_path):
    path = tmp_path / "log.jsonl"
    first, second = JsonlLog(path), JsonlLog(path)
    assert first.append({"key": "x"})
    assert not second.append({"key": "x"})  # read under the lock before writing
    assert "x" in second


def test_records_without_the_key_are_refused(tmp_path):
    path = tmp_path / "log.jsonl"
    with pytest.raises(InputError, match="needs a 'key'"):
        JsonlLog(path).append({"v": 1})
    path.write_text('{"v": 1}\n')
    with pytest.raises(FileFormatError, match=r"log.jsonl:1: .*'key'"):
        JsonlLog(path)


def test_keep_only_rewrites_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = JsonlLog(path, key="step")
    for step in range(1, 6):
        log.append({"step": step})
    assert log.keep_only(lambda r: r["step"] <= 3) == 2
    assert [r["step"] for r in JsonlLog(path, key="step").records()] == [1, 2, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_log_path_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        JsonlLog(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="is a file"):
        JsonlLog(tmp_path / "file" / "log.jsonl")


# ----- readers ------------------------------------------------------------------------------------

def test_read_text_drops_a_bom_and_names_the_byte_of_a_bad_encoding(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\n")
    assert read_text(path) == "hello\n"
    path.write_bytes(b"line one\ncaf\xe9\n")
    with pytest.raises(FileFormatError, match=r"t.txt:2: not UTF-8 text \(byte 0xe9 at byte offset 12\)"):
        read_text(path)


def test_iter_jsonl_refuses_deep_nesting_and_lone_surrogates(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n' + "[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(FileFormatError, match=r"d.jsonl:2: JSON nested too deeply"):
        list(iter_jsonl(path))
    path.write_text('{"a": "\\ud800"}\n')
    with pytest.raises(FileFormatError, match=r"d.jsonl:1: .*lone surrogate"):
        list(iter_jsonl(path))


def test_iter_jsonl_reads_a_data_file_without_a_final_newline(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_read_csv_big_fields_bom_and_line_numbers(tmp_path):
    path = tmp_path / "c.csv"
    big = "x" * 200_000
    path.write_bytes(('\ufeffid,text\n1,"two\nlines"\n2,' + big + "\n").encode())
    header, rows = read_csv(path, ("id", "text"))
    assert header == ["id", "text"]
    assert [(line, row["id"]) for line, row in rows] == [(2, "1"), (4, "2")]
    assert rows[1][1]["text"] == big
    path.write_text("id,text\n1,a,extra\n")
    with pytest.raises(FileFormatError, match=r"c.csv:2: more fields"):
        read_csv(path, ("id",))
    with pytest.raises(FileFormatError, match=r"c.csv:1: missing column\(s\) other"):
        read_csv(path, ("other",))


def test_read_json_names_the_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("{")
    with pytest.raises(FileFormatError, match=r"s.json: not valid JSON"):
        read_json(path)
    with pytest.raises(InputError, match="no such"):
        read_json(tmp_path / "missing.json")


# ----- atomic writes ------------------------------------------------------------------------------

def test_atomic_writes_leave_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")
    import os

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_directory_replaces_on_success_and_cleans_up_on_error(tmp_path):
    final = tmp_path / "model"
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("interrupted")
    assert (final / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
