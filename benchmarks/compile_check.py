"""Compile every kernel variant the wrappers can launch for real GPUs, without a GPU.

    python -m benchmarks.compile_check                 # sm_80 + sm_90, every tile, 4 mask-flag sets
    python -m benchmarks.compile_check --level ci      # the CI subset (tests/kernels/test_compile_check.py)
    python -m benchmarks.compile_check --level full    # every flag combination (long)
    python -m benchmarks.compile_check --kernels attention --dtype float32-ieee   # one dtype's variants
    python -m benchmarks.compile_check --device        # for the GPU of this machine (scripts/gpu_check.sh)

Each variant is compiled ahead of time with Triton's own compiler (``triton.compile`` of an
``ASTSource`` for a ``GPUTarget("cuda", 80 | 90, 32)``, nothing launched) and ptxas from the Triton
wheel. Per variant it reports registers, spill stores / loads (ptxas' own log), shared memory
(Triton's allocation) and which tensor-core instructions the PTX holds (``wgmma`` on sm_90,
``mma.sync`` on either), and checks: compiles; zero spills; shared memory within the
architecture's per-block limit (sm_80 163 KiB, sm_90 227 KiB); tensor-core instructions in every
attention kernel (except IEEE float32, whose dots are FMAs by definition). Exit status 1 when any check fails.

Variants come from the wrappers' own tables (``attention_triton.GPU_TILES`` / ``GPU_TILES_TF32`` /
``GPU_TILES_IEEE``, the top-k block
choice), so a tile added there is checked here. Attention: kernels fwd / dkdv / dq, head-dim blocks
16–256, float16 / bfloat16 / float32 (TF32), mask-flag sets. Top-k: the partial and merge kernels
over k, vocabulary blocks, target tiles and candidate-block counts.

Rows (kernel, arch, head dim, dtype, flags, block sizes, warps, stages, registers, spills, shared
memory, tensor cores, triton / ptxas versions, date) are appended to
``benchmarks/results/compile_check.csv``. Compiles run in worker processes (``--jobs``), with a
fresh Triton cache so that ptxas runs and reports every time.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "compile_check.csv"

# Per-block shared memory limits (opt-in maximum), bytes: A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
FIELDS = ["kernel", "arch", "head_dim", "dtype", "precision", "flags", "blocks", "num_warps", "num_stages",
          "registers", "spill_stores", "spill_loads", "stack_bytes", "shared_bytes", "smem_limit", "tensor_cores",
          "compile_s", "ok", "problems", "triton", "ptxas", "date"]

ATTENTION_FLAGS = ("CAUSAL", "HAS_PAD", "HAS_WINDOW", "HAS_SOFTCAP")
# Flag sets the default level checks: plain causal, non-causal, Gemma-2 style (everything), and a
# padded, capped bidirectional encoder. `full` checks all 12 valid combinations (window needs causal).
DEFAULT_FLAG_SETS = (("CAUSAL",), (), ("CAUSAL", "HAS_PAD", "HAS_WINDOW", "HAS_SOFTCAP"), ("HAS_PAD", "HAS_SOFTCAP"))
# CI: everything on (one masked loop, the most live values) and plain causal (the three-run loop
# whose middle run skips the mask).
CI_FLAG_SETS = (("CAUSAL", "HAS_PAD", "HAS_WINDOW", "HAS_SOFTCAP"), ("CAUSAL",))
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _all_flag_sets():
    for bits in itertools.product((False, True), repeat=4):
        flags = tuple(name for name, on in zip(ATTENTION_FLAGS, bits) if on)
        if "HAS_WINDOW" in flags and "CAUSAL" not in flags:
            continue
        yield flags


# ----------------------------------------------------------------------------- variants

def attention_variants(level: str, archs=ARCHS, dtypes=None) -> list[dict]:
    """Every (kernel, arch, head-dim block, dtype, flags, tile) the attention wrappers can launch
    (``level="full"``), the default subset, or the CI subset; ``dtypes`` keeps only those input
    dtypes ("float32-ieee" names float32 with IEEE dots)."""
    from deepalign.kernels import attention_triton as at

    flag_sets = {"ci": CI_FLAG_SETS, "default": DEFAULT_FLAG_SETS, "full": tuple(_all_flag_sets())}[level]
    precisions = [("float16", "tf32"), ("bfloat16", "tf32"), ("float32", "tf32"), ("float32", "ieee")]
    if dtypes:
        precisions = [(d, p) for d, p in precisions if (d if p == "tf32" else f"{d}-{p}") in dtypes]
    variants = []
    for kernel, arch, block_d, (dtype, precision), flags in itertools.product(
            at.KERNELS, archs, at.BLOCK_DS, precisions, flag_sets):
        if level == "ci" and not _in_ci_attention(kernel, arch, block_d, dtype, precision):
            continue
        tiles = at.gpu_tiles(kernel, arch, block_d, precision, dtype)
        if level == "ci":
            tiles = tiles[:1]
        for tile in tiles:
            tanh = "libdevice" if dtype == "float32" else "approx"
            constexprs = {name: name in flags for name in ATTENTION_FLAGS}
            constexprs.update(PRECISION=precision, TANH=tanh, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                              BLOCK_D=block_d)
            variants.append(dict(kernel=kernel, module="deepalign.kernels.attention_triton",
                                 fn=at._KERNEL_FNS[kernel], arch=arch, head_dim=block_d, dtype=dtype,
                                 precision=precision, flags="+".join(f.removeprefix("HAS_").lower() for f in flags)
                                 or "none", constexprs=constexprs, num_warps=tile.num_warps,
                                 num_stages=tile.num_stages,
                                 blocks=f"M{tile.block_m} N{tile.block_n} D{block_d}"))
    return variants


def _in_ci_attention(kernel, arch, block_d, dtype, precision) -> bool:
    """CI: each kernel at the head dims where registers run highest (64, 128), bf16, under each of
    ``CI_FLAG_SETS``; plus the fp32 (TF32) forward at 128 on sm_80 (the largest shared memory) and
    every kernel in IEEE fp32 at 128 on sm_80 (the CUDA-core dots, a few seconds each)."""
    if dtype == "float16":
        return False
    if dtype == "float32":
        return block_d == 128 and arch == 80 and (kernel == "fwd" or precision == "ieee")
    return block_d in (64, 128)


def topk_variants(level: str, archs=ARCHS) -> list[dict]:
    """Partial and merge kernels of ``topk_rank`` as a GPU launch builds them (bitonic selection)."""
    from deepalign.kernels import ranking_triton as rt

    if level == "full":
        ks, blocks, nbs, dtypes = list(range(1, rt.MAX_K_KERNEL + 1)), rt.GPU_BLOCK_VS, rt.MERGE_NB_PADS, DTYPES
    elif level == "default":
        ks, blocks, dtypes = [1, 2, 3, 8, 20, 64], rt.GPU_BLOCK_VS, ["bfloat16", "float32"]
        nbs = [rt.MERGE_NB_PADS[0], 8, rt.MAX_BLOCKS_PER_ROW]
    else:  # CI: k = 1 (no tl.topk) and k = 20 (RAP's), smallest and largest block (k = 64 compiles take ~30 s)
        ks, blocks, nbs, dtypes = [1, 20], [rt.GPU_BLOCK_VS[0], rt.GPU_BLOCK_VS[-1]], [8], ["bfloat16"]
    m_tiles = [1, rt.M_TILE_MAX]
    variants = []
    for arch, dtype, k in itertools.product(archs, dtypes, ks):
        kp = 1 << (k - 1).bit_length()
        bitonic = rt.use_bitonic(k, interpreted=False)
        for block_v, m_tile in itertools.product(blocks, m_tiles):
            if level == "ci" and (m_tile == 1 or (k == 20) == (block_v == blocks[-1])):
                continue
            warps = rt.partial_warps(block_v)
            prefilter = rt.prefilter_shape(kp, block_v)  # as the launch uses it
            groups, cap = prefilter or (1, 1)
            variants.append(dict(kernel="topk_partial", module="deepalign.kernels.ranking_triton",
                                 fn="_topk_rank_partial_kernel", arch=arch, head_dim="", dtype=dtype, precision="",
                                 flags=f"k{k}" + ("+bitonic" if bitonic else "") + ("+prefilter" if prefilter else ""),
                                 constexprs=dict(BLOCK_V=block_v, K=k, KP=kp, M_TILE=m_tile, BITONIC=bitonic,
                                                 PREFILTER=prefilter is not None, GROUPS=groups, CAP=cap),
                                 num_warps=warps, num_stages=3, blocks=f"V{block_v} M{m_tile}"))
        for nb_pad, m_tile in itertools.product(nbs, m_tiles):
            if level == "ci" and (m_tile == 1 or k == 1):
                continue
            variants.append(dict(kernel="topk_merge", module="deepalign.kernels.ranking_triton",
                                 fn="_topk_rank_merge_kernel", arch=arch, head_dim="", dtype=dtype, precision="",
                                 flags=f"k{k}" + ("+bitonic" if bitonic else ""),
                                 constexprs=dict(K=k, KP=kp, NB_PAD=nb_pad, M_TILE=m_tile, BITONIC=bitonic),
                                 num_warps=rt.MERGE_WARPS, num_stages=3, blocks=f"NB{nb_pad} M{m_tile}"))
    return variants


# ----------------------------------------------------------------------------- compiling

# Pointer arguments by name ("DATA": the dtype of the variant); other non-constexpr arguments are
# float32 scalars when named here, else int32.
_POINTERS = {
    **{name: "DATA" for name in ("Q", "K", "V", "OUT", "DO", "DK", "DV", "DQ", "logits_ptr", "values_ptr")},
    "PREFILL": "*u8", "KPAD": "*u8",
    **{name: "*fp32" for name in ("MASS", "LSE", "DELTA", "GMASS", "part_max_ptr", "part_sumexp_ptr", "lse_ptr",
                                  "logprob_ptr")},
    **{name: "*i64" for name in ("targets_ptr", "part_keys_ptr", "indices_ptr", "rank_ptr", "scratch_ptr")},
    **{name: "*i32" for name in ("part_counts_ptr", "part_bad_ptr", "bad_ptr", "bad_targets_ptr")},
}
_FLOATS = {"scale", "softcap"}


def _signature(fn, dtype: str, constexprs: dict):
    """``(signature, attrs)`` for ``ASTSource``: pointers and strides carry Triton's 16-divisibility
    attribute, as a launch on contiguous, aligned tensors with a head dim / vocabulary that is a
    multiple of 16 gets."""
    from triton.compiler import make_backend  # noqa: F401  (import check: the compiler is there)
    from triton.backends.compiler import BaseBackend

    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            continue
        if name in _POINTERS:
            kind = _POINTERS[name]
            signature[name] = f"*{DTYPES[dtype]}" if kind == "DATA" else kind
            attrs[(index,)] = BaseBackend.parse_attr("D")
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if "stride" in name:
                attrs[(index,)] = BaseBackend.parse_attr("D")
    missing = set(constexprs) - set(signature)
    if missing:
        raise KeyError(f"{fn.__name__} has no constexpr parameters {sorted(missing)}")
    return signature, attrs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_kernel(variant: dict):
    """Triton's ``CompiledKernel`` of one variant for ``GPUTarget("cuda", arch, 32)`` (ptxas' log,
    with registers and spills, goes to standard output)."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(variant["module"]), variant["fn"])
    signature, attrs = _signature(fn, variant["dtype"], variant["constexprs"])
    knobs.nvidia.dump_ptxas_log = True
    return triton.compile(ASTSource(fn, signature, variant["constexprs"], attrs),
                          target=GPUTarget("cuda", variant["arch"], 32),
                          options=dict(num_warps=variant["num_warps"], num_stages=variant["num_stages"]))


def compile_variant(variant: dict) -> dict:
    """Compile one variant for ``GPUTarget("cuda", arch, 32)`` and return its row."""
    import triton

    row = {key: variant[key] for key in ("kernel", "arch", "head_dim", "dtype", "precision", "flags", "blocks",
                                         "num_warps", "num_stages")}
    row.update(smem_limit=SMEM_LIMIT[variant["arch"]], triton=triton.__version__)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = compile_kernel(variant)
    except Exception as error:  # a compile failure is a result, not a crash of the check
        row.update(ok=False, problems=f"compile failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}",
                   compile_s=round(time.perf_counter() - start, 2))
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    text = log.getvalue()
    regs = _PTXAS_REGS.findall(text)
    spills = _PTXAS_SPILLS.findall(text)
    if regs and spills:
        row.update(registers=int(regs[-1]), stack_bytes=int(spills[-1][0]), spill_stores=int(spills[-1][1]),
                   spill_loads=int(spills[-1][2]))
    else:
        row.update(_resource_usage(compiled.asm["cubin"]))
    row["shared_bytes"] = int(compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    cores = [name for name, needle in (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync")) if needle in ptx]
    row["tensor_cores"] = "+".join(cores) or "none"
    row["problems"] = "; ".join(problems(row))
    row["ok"] = not row["problems"]
    return row


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes from ``cuobjdump --dump-resource-usage`` (when ptxas' log is not
    available, e.g. a cache hit); spills are then taken to be the stack frame."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        import subprocess

        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", handle.name],
                              capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    return dict(registers=regs, stack_bytes=stack, spill_stores=stack, spill_loads=stack)


def problems(row: dict) -> list[str]:
    """What fails the check for a compiled row."""
    found = []
    if row.get("spill_stores") or row.get("spill_loads"):
        found.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded")
    if row["shared_bytes"] > row["smem_limit"]:
        found.append(f"shared memory {row['shared_bytes']} B > {row['smem_limit']} B")
    if row["kernel"] in ("fwd", "dkdv", "dq") and row.get("precision") != "ieee" and row["tensor_cores"] == "none":
        found.append("no tensor-core instruction")  # IEEE float32 dots run on CUDA cores by design
    return found


def _ptxas_version() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return str(get_ptxas(90).version)
    except Exception:  # older layouts
        return ""


def _init_worker(cache_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def run(variants: list[dict], jobs: int) -> list[dict]:
    """Compile ``variants`` in ``jobs`` worker processes (a fresh Triton cache, removed after)."""
    import multiprocessing

    cache_dir = tempfile.mkdtemp(prefix="deepalign-compile-check-")
    try:
        if jobs <= 1:
            _init_worker(cache_dir)
            return [compile_variant(v) for v in variants]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(cache_dir,)) as pool:
            return list(pool.map(compile_variant, variants, chunksize=1))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def write_rows(rows: list[dict], path: Path = CSV_PATH) -> Path:
    """Append rows to the CSV (header written when the file is new)."""
    stamp = dict(ptxas=_ptxas_version(), date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**row, **stamp})
    return path


def summary(rows: list[dict]) -> str:
    """Max registers / spills / shared memory per (kernel, arch, head dim), and the failures."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["arch"], row["head_dim"]), []).append(row)
    lines = [f"{'kernel':<13}{'arch':>5}{'D':>5}{'variants':>9}{'max regs':>9}{'max spill B':>12}"
             f"{'max smem KiB':>13}  tensor cores"]
    for (kernel, arch, dim), group in groups.items():
        built = [r for r in group if "registers" in r]
        regs = max((r["registers"] for r in built), default=0)
        spill = max((r["spill_stores"] for r in built), default=0)
        smem = max((r["shared_bytes"] for r in built), default=0) / 1024
        cores = ",".join(sorted({r["tensor_cores"] for r in built}))
        lines.append(f"{kernel:<13}{arch:>5}{str(dim):>5}{len(group):>9}{regs:>9}{spill:>12}{smem:>13.1f}  {cores}")
    failed = [r for r in rows if not r["ok"]]
    lines.append(f"{len(rows)} variants, {len(failed)} failed")
    for row in failed:
        lines.append(f"  FAIL {row['kernel']} sm_{row['arch']} D={row['head_dim']} {row['dtype']} "
                     f"{row['precision']} {row['flags']} {row['blocks']} w{row['num_warps']} s{row['num_stages']}: "
                     f"{row['problems']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--level", choices=["ci", "default", "full"], default="default")
    parser.add_argument("--kernels", choices=["all", "attention", "topk"], default="all")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compile for this arch only (repeatable; default both)")
    parser.add_argument("--device", action="store_true",
                        help="compile for this machine's GPU (its capability mapped to the 80 or 90 tables)")
    parser.add_argument("--dtype", action="append", choices=[*DTYPES, "float32-ieee"],
                        help="attention variants of this input dtype only (repeatable; default all the level has)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-save", action="store_true", help="print only; do not append rows to results/")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list to PATH")
    args = parser.parse_args(argv)
    # Triton decides at import time whether @jit interprets: the kernel modules load after this.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    archs = tuple(args.arch or ARCHS)
    if args.device:
        import torch

        major, minor = torch.cuda.get_device_capability()
        archs = (90 if major == 9 else 80,)
        print(f"device: {torch.cuda.get_device_name()} (sm_{major}{minor}) -> sm_{archs[0]} tables")
    variants = []
    if args.kernels in ("all", "attention"):
        variants += attention_variants(args.level, archs, args.dtype)
    if args.kernels in ("all", "topk"):
        variants += topk_variants(args.level, archs)
    start = time.perf_counter()
    rows = run(variants, args.jobs)
    print(summary(rows))
    print(f"compiled in {time.perf_counter() - start:.0f} s with {args.jobs} job(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows), encoding="utf-8")
    if not args.no_save:
        print(f"rows appended to {write_rows(rows)}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
