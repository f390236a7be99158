"""Shared benchmark plumbing: timing (device events on a GPU, wall clock on the CPU) and JSON rows.

Rows are appended, one JSON object per line, to ``benchmarks/results/<kernel>.jsonl`` with the
kernel, provider, shape, dtype, median milliseconds, the throughput figure, the device name,
torch / triton versions and the date.
"""

from __future__ import annotations

import datetime as _dt
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 7) -> float:
    """Median time of ``fn()`` in milliseconds: ``triton.testing.do_bench`` on a GPU, else a wall clock."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def append_rows(kernel: str, rows: list[dict]) -> Path:
    """Append ``rows`` (plus versions, device and date) to ``results/<kernel>.jsonl``."""
    import triton

    from deepalign.io import JsonlLog

    log = JsonlLog(RESULTS / f"{kernel}.jsonl", key=None)
    stamp = {"torch": torch.__version__, "triton": triton.__version__,
             "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for row in rows:
        log.append({"kernel": kernel, **row, **stamp})
    return log.path


def bench_main(kernel: str, doc: str, run: Callable[[bool], list[dict]]) -> None:
    """Command line shared by the benchmarks: ``--quick`` for a few shapes, ``--no-save`` to only
    print; otherwise the rows are appended to ``results/<kernel>.jsonl``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--no-save", action="store_true", help="print, do not append rows to results/")
    args = parser.parse_args()
    rows = run(args.quick)
    if not args.no_save:
        print(f"rows appended to {append_rows(kernel, rows)}")
