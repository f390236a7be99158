"""Search spill-free attention tiles with the compile check (how ``attention_triton.GPU_TILES`` was chosen).

    python -m benchmarks.tile_search --kernel dkdv --arch 90 --head-dim 128
    python -m benchmarks.tile_search            # every kernel, arch and head-dim block (about 10 min on 2 cores)

Each candidate tile (BLOCK_M × BLOCK_N, warps, stages) is compiled for three flag sets (causal, none,
and causal + padding + window + softcap), in the given dtype (float32 as TF32 by default: the largest
operand tiles), and printed with its largest register count, spills and shared memory over them;
spill-free tiles within the shared-memory limit are marked. Nothing is written to results/
(``python -m benchmarks.compile_check`` records the chosen tiles).
"""

from __future__ import annotations

import argparse
import itertools
import os

from benchmarks import compile_check as cc

PAIRS = [(128, 128), (128, 64), (64, 128), (64, 64), (128, 32), (64, 32), (32, 64), (32, 32)]
# The compile check's default flag sets whose code differs most: causal and no flags run three loops
# (the whole tiles without the mask), everything-on runs one masked loop with the most live values.
FLAG_SETS = cc.DEFAULT_FLAG_SETS[:3]


def candidates(kernel: str, arch: int, block_d: int, dtypes=("float32",), pairs=PAIRS) -> list[dict]:
    from deepalign.kernels import attention_triton as at

    variants = []
    for (block_m, block_n), warps, stages, dtype, flags in itertools.product(pairs, (4, 8), (1, 2), dtypes,
                                                                             FLAG_SETS):
        constexprs = {name: name in flags for name in cc.ATTENTION_FLAGS}
        constexprs.update(PRECISION="tf32", TANH="libdevice" if dtype == "float32" else "approx",
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
        variants.append(dict(kernel=kernel, module="deepalign.kernels.attention_triton", fn=at._KERNEL_FNS[kernel],
                             arch=arch, head_dim=block_d, dtype=dtype, precision="tf32",
                             flags="+".join(flags) or "none", constexprs=constexprs, num_warps=warps,
                             num_stages=stages, blocks=f"M{block_m} N{block_n} D{block_d}"))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", action="append", choices=["fwd", "dkdv", "dq"])
    parser.add_argument("--arch", type=int, action="append", choices=cc.ARCHS)
    parser.add_argument("--head-dim", type=int, action="append", choices=[16, 32, 64, 128, 256])
    parser.add_argument("--dtype", action="append", choices=list(cc.DTYPES))
    parser.add_argument("--pairs", help="BLOCK_M×BLOCK_N pairs to try, e.g. 64x64,64x32 (default: all eight)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.environ["TRITON_INTERPRET"] = "0"
    pairs = [tuple(int(n) for n in pair.split("x")) for pair in args.pairs.split(",")] if args.pairs else PAIRS
    variants = [v for kernel in args.kernel or ["fwd", "dkdv", "dq"] for arch in args.arch or cc.ARCHS
                for d in args.head_dim or [16, 32, 64, 128, 256]
                for v in candidates(kernel, arch, d, tuple(args.dtype or ["float32"]), pairs)]
    rows = cc.run(variants, args.jobs)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["arch"], row["head_dim"], row["blocks"], row["num_warps"],
                           row["num_stages"]), []).append(row)
    print(f"{'kernel':<6}{'arch':>5}{'D':>5} {'tile':<16}{'w':>3}{'s':>3}{'regs':>6}{'spill B':>9}{'smem KiB':>10}  ok")
    for (kernel, arch, dim, blocks, warps, stages), group in groups.items():
        built = [r for r in group if "registers" in r]
        if len(built) < len(group):
            print(f"{kernel:<6}{arch:>5}{dim:>5} {blocks:<16}{warps:>3}{stages:>3}  compile failed")
            continue
        regs = max(r["registers"] for r in built)
        spill = max(r["spill_stores"] for r in built)
        smem = max(r["shared_bytes"] for r in built)
        ok = all(r["ok"] for r in built)
        print(f"{kernel:<6}{arch:>5}{dim:>5} {blocks:<16}{warps:>3}{stages:>3}{regs:>6}{spill:>9}{smem / 1024:>10.1f}"
              f"  {'yes' if ok else ''}")


if __name__ == "__main__":
    main()
