"""Selection cost of ``topk_rank``'s stage 1 without a GPU: SASS instructions per logit, full network
against the candidate pre-filter, from Triton's compiler and ptxas for ``GPUTarget("cuda", arch, 32)``.

    python -m benchmarks.topk_selection_cost            # sm_80 and sm_90, blocks 1024 / 2048, k 2, 4, 20, 64
    python -m benchmarks.topk_selection_cost --quick    # sm_90, block 2048, k 20

Three builds of the stage-1 kernel per shape: ``k = 1`` (one max reduction: everything but the
selection), the full bitonic network (``prefilter=False``) and the pre-filter (``prefilter=True``,
which also holds the full network as its fallback). Straight-line code dominates the kernel (the
selection networks are unrolled), so static instruction counts stand in for executed ones:

* network cost     = (full − k1) instructions per thread,
* pre-filter path  = (pre-filter − full) per thread: threshold, compaction and the two small
  networks (the fallback's copy of the full network cancels against ``full``),
* rest             = the ``k = 1`` build (load, keys, logsumexp, counters, one target's rank),

each times the program's threads over ``BLOCK_V`` logits. At k = 2 the pre-filter is built although
launches do not use it there: the row shows why. These are estimates of issued
instructions, not timings: a GPU run (``benchmarks.topk_rank``) is the measurement.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

from benchmarks import compile_check as cc
from benchmarks.common import bench_main

# Triton's SASS listing: one instruction per line after its control code, e.g.
# ``--:-:2:-:1\t@!P0 LDG.E R13, desc[UR18][R4.64];``.
_SASS_LINE = re.compile(r"^[-0-9:A-Za-z]+\t(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.MULTILINE)


def sass_instructions(sass: str) -> int:
    """Instructions in a SASS listing, ``NOP`` padding excluded."""
    return sum(1 for match in _SASS_LINE.finditer(sass) if match.group(2) != "NOP")


def _variant(arch: int, block_v: int, k: int, prefilter: bool) -> dict:
    from deepalign.kernels import ranking_triton as rt

    kp = 1 << (k - 1).bit_length()
    # The pre-filter's shape even where the launch does not use it (k ≤ 2), to show why it does not.
    shape = (rt.PREFILTER_GROUPS_PER_KP * kp, rt.PREFILTER_CAP_PER_KP * kp) if prefilter else None
    groups, cap = shape or (1, 1)
    return dict(kernel="topk_partial", module="deepalign.kernels.ranking_triton", fn="_topk_rank_partial_kernel",
                arch=arch, head_dim="", dtype="float32", precision="", flags="", blocks=f"V{block_v}",
                constexprs=dict(BLOCK_V=block_v, K=k, KP=kp, M_TILE=1, BITONIC=k > 1, PREFILTER=shape is not None,
                                GROUPS=groups, CAP=cap),
                num_warps=rt.partial_warps(block_v), num_stages=3)


def _count(variant: dict) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return sass_instructions(cc.compile_kernel(variant).asm["sass"])


def run(quick: bool) -> list[dict]:
    os.environ["TRITON_INTERPRET"] = "0"
    from deepalign.kernels import ranking_triton as rt

    shapes = [(90, 2048, 20)] if quick else [(arch, block_v, k) for arch in cc.ARCHS for block_v in rt.GPU_BLOCK_VS
                                             for k in (2, 4, 20, 64)]
    rows = []
    for arch, block_v, k in shapes:
        base = _count(_variant(arch, block_v, 1, False))
        full = _count(_variant(arch, block_v, k, False))
        pre = _count(_variant(arch, block_v, k, True))
        threads = 32 * _variant(arch, block_v, k, False)["num_warps"]
        network = (full - base) * threads / block_v
        path = (pre - full) * threads / block_v
        row = dict(arch=f"sm_{arch}", block_v=block_v, k=k, threads=threads, sass_k1=base, sass_full=full,
                   sass_prefilter=pre, rest_per_logit=round(base * threads / block_v, 1),
                   network_per_logit=round(network, 1), prefilter_path_per_logit=round(path, 1),
                   ratio=round(network / path, 2) if path > 0 else None)
        print(f"sm_{arch} V{block_v:<5} k{k:<3} per logit: rest of the kernel {row['rest_per_logit']:6.1f}, "
              f"full network {network:6.1f}, pre-filter path {path:6.1f} ({row['ratio']}×)", flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    bench_main("topk_selection_cost", __doc__, run)
