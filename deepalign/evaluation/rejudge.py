"""Re-judging an attack's result log with another judge, resumably.

:func:`rejudge` reads every record of a result log (a :class:`deepalign.io.JsonlLog` written by
``deepalign attack``), judges each one whose key is not yet in the output log, and appends the
record with the judge's fields (``score``, ``refused``, ``harmful``, …) and ``judge`` set to the
judge's name. An answer the judge could not read is recorded with ``score`` null and named as it
happens; summaries count it apart. The source log is only read, so it may still be growing: a rerun picks up its new
records.
"""

from __future__ import annotations

from typing import Callable

from tqdm.auto import tqdm

from deepalign.data.benchmarks import AttackTarget
from deepalign.errors import FileFormatError
from deepalign.io import JsonlLog

Judge = Callable[[AttackTarget, str], dict]


def rejudge(source: JsonlLog, output: JsonlLog, judge: Judge, name: str, *, progress: bool = True) -> list[dict]:
    """Judge the records of ``source`` missing from ``output``; returns all of ``output``'s records."""
    records = source.records()
    if not records:
        raise FileFormatError(f"{source.path}: the log has no records")
    for index, record in enumerate(records, start=1):
        missing = [f for f in ("id", "prompt", "output") if not isinstance(record.get(f), str)]
        if missing:
            raise FileFormatError(f"{source.path}: record {index} (key {record['key']!r}) has no "
                                  f"{', '.join(missing)}; is it a result log of deepalign attack?")
    unparsed = 0
    for record in tqdm([r for r in records if r["key"] not in output], desc=f"judge {name}", disable=not progress):
        target = AttackTarget(record["id"], record["prompt"], "", record.get("category", ""),
                              **{f: record.get(f, "") for f in ("behavior", "context", "functional_category", "prefill")})
        verdict = judge(target, record["output"])
        if verdict.get("score") is None and not verdict.get("copyright"):
            unparsed += 1
            tqdm.write(f"{record['key']}: the judge's answer could not be read, recorded unscored: "
                       f"{str(verdict.get('judge_answer', ''))[:100]!r}")
        output.append({**record, **verdict, "judge": name})
    if unparsed:
        tqdm.write(f"{unparsed} answer(s) could not be read; they are in {output.path} with score null")
    return output.records()
