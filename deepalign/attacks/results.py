"""Resumable result logs (JSON lines, one record per finished item) and summary tables.

Every record has a ``key`` naming the item (prompt, setting, run). A rerun opens the same log,
skips the keys already there and appends the rest, so an interrupted attack loses at most the item
it was writing. A last line cut off by a crash is dropped (that item is simply redone); a broken
line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence


class ResultLog:
    """Append-only JSON-lines log keyed by ``record["key"]``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records = self._load()
        self._keys = {record["key"] for record in self._records}

    def _load(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a record cut off by an interruption: redo that item
                    self.path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
                    break
                raise ValueError(f"{self.path}:{number}: not a JSON record") from None
            if not isinstance(record, dict) or "key" not in record:
                raise ValueError(f"{self.path}:{number}: a result record needs a 'key'")
            records.append(record)
        return records

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def append(self, record: dict) -> None:
        if "key" not in record:
            raise ValueError("a result record needs a 'key'")
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self._records.append(record)
        self._keys.add(record["key"])

    def records(self) -> list[dict]:
        return list(self._records)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(records: Iterable[dict], metric: str, by: Sequence[str], *, runs: str = "run") -> list[dict]:
    """Mean ± std of ``metric`` over runs, per group of ``by`` fields: first the mean over items
    within each run, then mean and std of those per-run means (as the papers' tables report)."""
    per_run: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for record in records:
        group = tuple(record.get(field) for field in by)
        per_run[group][record.get(runs, 0)].append(float(record[metric]))
    rows = []
    for group in sorted(per_run, key=lambda g: tuple(_natural(x) for x in g)):
        run_means = [sum(v) / len(v) for v in per_run[group].values()]
        mean, std = mean_std(run_means)
        rows.append({**dict(zip(by, group)), f"{metric}_mean": mean, f"{metric}_std": std,
                     "runs": len(run_means), "items": sum(len(v) for v in per_run[group].values())})
    return rows


def _natural(value) -> tuple:
    """Sort key that orders "prefill=5" before "prefill=10"."""
    parts = re.split(r"(\d+(?:\.\d+)?)", str(value))
    return tuple((0, float(p)) if i % 2 else (1, p) for i, p in enumerate(parts))


def format_table(rows: list[dict], by: Sequence[str], metric: str) -> str:
    """Plain-text table of :func:`summarize` rows: ``by`` columns, then ``mean ± std``."""
    header = " ".join(f"{field:>14}" for field in by) + f" {metric + ' (mean ± std)':>26} {'runs':>5}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(" ".join(f"{str(row[field]):>14}" for field in by)
                     + f" {row[metric + '_mean']:>17.3f} ± {row[metric + '_std']:<6.3f} {row['runs']:>5}")
    return "\n".join(lines)
