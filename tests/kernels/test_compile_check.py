"""GPU readiness without a GPU: the CI subset of ``python -m benchmarks.compile_check``.

Representative variants of every kernel are compiled for sm_80 and sm_90 with Triton's own
compiler and the ptxas of its wheel (no GPU, nothing launched) and must compile with zero register
spills, shared memory within the per-block limit, and tensor-core instructions in the attention
kernels. The compile runs in a subprocess: this test session has ``TRITON_INTERPRET=1`` set, and
Triton fixes interpretation when a kernel module is imported. IEEE float32 (CUDA-core dots, no
tensor cores by definition) is checked at one head dim on sm_80.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).exists()
    except Exception:
        return False


pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not _has_nvidia_backend(),
                                reason="needs triton with its NVIDIA backend (ptxas)")


@pytest.fixture(scope="module")
def ci_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--level", "ci", "--no-save",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"compile check did not run:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text()), done


def test_ci_subset_compiles_spill_free_for_sm80_and_sm90(ci_rows):
    rows, done = ci_rows
    kernels = {(row["kernel"], row["arch"]) for row in rows}
    assert kernels == {(kernel, arch) for kernel in ("fwd", "dkdv", "dq", "topk_partial", "topk_merge")
                       for arch in (80, 90)}
    failed = [row for row in rows if not row["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} sm_{r['arch']} D={r['head_dim']} {r['dtype']} {r['flags']} "
                                 f"{r['blocks']} w{r['num_warps']}: {r['problems']}" for r in failed)
    for row in rows:
        assert row["registers"] > 0 and row["spill_stores"] == 0 and row["spill_loads"] == 0
        assert row["shared_bytes"] <= {80: 163 * 1024, 90: 227 * 1024}[row["arch"]]
        if row["kernel"] in ("fwd", "dkdv", "dq") and row["precision"] != "ieee":
            assert row["tensor_cores"] != "none"
    assert {r["kernel"] for r in rows if r["precision"] == "ieee"} == {"fwd", "dkdv", "dq"}
    # Hopper's warpgroup MMA where the tile allows it: the forward uses it at every CI head dim.
    assert all("wgmma" in r["tensor_cores"] for r in rows if r["kernel"] == "fwd" and r["arch"] == 90)
    assert done.returncode == 0


def test_the_check_flags_spills_smem_and_missing_tensor_cores():
    from benchmarks.compile_check import problems

    row = dict(kernel="dkdv", spill_stores=0, spill_loads=0, shared_bytes=1000, smem_limit=2000, tensor_cores="mma")
    assert problems(row) == []
    assert problems({**row, "spill_stores": 8, "spill_loads": 4}) == ["spills 8 B stored / 4 B loaded"]
    assert problems({**row, "shared_bytes": 2001}) == ["shared memory 2001 B > 2000 B"]
    assert problems({**row, "tensor_cores": "none"}) == ["no tensor-core instruction"]
    assert problems({**row, "kernel": "topk_merge", "tensor_cores": "none"}) == []
    assert problems({**row, "precision": "ieee", "tensor_cores": "none"}) == []  # FMA dots by definition


def test_every_launchable_attention_tile_is_enumerated():
    """The check's variants come from the wrappers' tables: each listed tile of each kernel, arch and
    head-dim block appears (the default level covers every tile)."""
    from benchmarks.compile_check import attention_variants
    from deepalign.kernels import attention_triton as at

    seen = {(v["kernel"], v["arch"], v["head_dim"], v["dtype"], v["precision"], v["blocks"], v["num_warps"],
             v["num_stages"]) for v in attention_variants("default")}
    for kernel in at.KERNELS:
        for arch in (80, 90):
            for block_d in at.BLOCK_DS:
                for dtype, precision in (("bfloat16", "tf32"), ("float32", "tf32"), ("float32", "ieee")):
                    for tile in at.gpu_tiles(kernel, arch, block_d, precision, dtype):
                        key = (kernel, arch, block_d, dtype, precision, f"M{tile.block_m} N{tile.block_n} D{block_d}",
                               tile.num_warps, tile.num_stages)
                        assert key in seen
