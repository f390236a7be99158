"""Summary tables of attack result logs.

A result log is a :class:`deepalign.io.JsonlLog`: one JSON line per finished item, each with a
``key`` naming the item (prompt, setting, run). A rerun opens the same log, skips the keys already
there and appends the rest, so an interrupted attack loses at most the item it was writing.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Iterable, Sequence


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
    within each run, then mean and std of those per-run means (as the papers' tables report).
    Records whose ``metric`` is ``None`` are left out of the mean and counted: in ``copyright``
    for HarmBench's copyright behaviours (judged by hashing, not by the classifier), else in
    ``unparsed`` (a judge answer that could not be read)."""
    per_run: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    unparsed: dict[tuple, int] = defaultdict(int)
    copyright: dict[tuple, int] = defaultdict(int)
    for record in records:
        group = tuple(record.get(field) for field in by)
        if record.get(metric) is None:
            (copyright if record.get("copyright") else unparsed)[group] += 1
            per_run.setdefault(group, defaultdict(list))  # a row even when nothing in it was scored
            continue
        per_run[group][record.get(runs, 0)].append(float(record[metric]))
    rows = []
    for group in sorted(per_run, key=lambda g: tuple(_natural(x) for x in g)):
        run_means = [sum(v) / len(v) for v in per_run[group].values()]
        mean, std = mean_std(run_means)
        rows.append({**dict(zip(by, group)), f"{metric}_mean": mean, f"{metric}_std": std,
                     "runs": len(run_means), "items": sum(len(v) for v in per_run[group].values()),
                     "unparsed": unparsed[group], "copyright": copyright[group]})
    return rows


def _natural(value) -> tuple:
    """Sort key that orders "prefill=5" before "prefill=10"."""
    parts = re.split(r"(\d+(?:\.\d+)?)", str(value))
    return tuple((0, float(p)) if i % 2 else (1, p) for i, p in enumerate(parts))


def format_table(rows: list[dict], by: Sequence[str], metric: str) -> str:
    """Plain-text table of :func:`summarize` rows: ``by`` columns, then ``mean ± std``, runs and
    items (and unparsed judge answers, when there are any)."""
    extra = [name for name in ("unparsed", "copyright") if any(row.get(name) for row in rows)]
    widths = {field: max([14, len(field)] + [len(str(row[field])) for row in rows]) for field in by}
    header = (" ".join(f"{field:>{widths[field]}}" for field in by)
              + f" {metric + ' (mean ± std)':>26} {'runs':>5} {'items':>6}" + "".join(f" {name:>9}" for name in extra))
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(" ".join(f"{str(row[field]):>{widths[field]}}" for field in by)
                     + f" {row[metric + '_mean']:>17.3f} ± {row[metric + '_std']:<6.3f} {row['runs']:>5} {row['items']:>6}"
                     + "".join(f" {row.get(name, 0):>9}" for name in extra))
    return "\n".join(lines)
