"""The GPU code paths, run in Triton's interpreter on small shapes so that CI exercises them:
attention with the GPU tile tables (BLOCK_M ≠ BLOCK_N, per-kernel backward tiles), head dims
below 32, the bitonic top-k selection (k = 1, 2, 3, 20) with GPU vocabulary blocks, the chunked
stage-2 merge, deferred top-k validation, and 64-bit offsets (a stride-only launch over a sparse
file: nothing of the 2³¹-element view is allocated)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from deepalign.kernels import TopKChecks, prefill_attention, topk_rank, topk_rank_chunked
from deepalign.kernels import attention as attention_module
from deepalign.kernels import attention_triton
from deepalign.kernels import ranking_triton
from deepalign.kernels._dispatch import interpreter_enabled
from deepalign.kernels.ranking_triton import topk_rank_triton
from tests.helpers import DEVICE
from tests.kernels.test_attention import check_accuracy, make_case
from tests.kernels.test_ranking import assert_matches, make_logits

REPOSITORY = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not interpreter_enabled() and DEVICE.type != "cuda",
                                reason="needs the Triton interpreter or a GPU")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(attention_triton, "POISON_OUTPUTS", True)
    monkeypatch.setattr(ranking_triton, "POISON_OUTPUTS", True)


def use_gpu_tiles(monkeypatch, arch: int, block_d: int, dtype: torch.dtype = torch.bfloat16, precision: str = "tf32"):
    """Make the interpreter launch each attention kernel with its first GPU tile for ``arch``,
    ``dtype`` and dot ``precision``."""
    tiles = {name: attention_triton.gpu_tiles(name, arch, block_d, precision, attention_triton.dtype_name(dtype))[0]
             for name in attention_triton.KERNELS}
    monkeypatch.setattr(attention_triton, "INTERPRETER_TILES", tiles)
    return tiles


@pytest.mark.parametrize("arch, dim, dtype, padding, options", [
    (90, 64, torch.float32, True, dict(window=37, softcap=20.0)),
    (80, 128, torch.float16, True, dict()),
    (90, 16, torch.float16, True, dict(causal=False, softcap=5.0)),
    (80, 64, torch.float16, False, dict(window=100)),
    (90, 128, torch.float32, False, dict()),
], ids=["sm90-d64-all-options", "sm80-d128-fp16", "sm90-d16-full-softcap", "sm80-d64-window-unmasked-tiles",
        "sm90-d128-fp32-unmasked-tiles"])
def test_attention_with_gpu_tiles(monkeypatch, arch, dim, dtype, padding, options):
    tiles = use_gpu_tiles(monkeypatch, arch, attention_triton.block_d_of(dim), dtype)
    assert any(t.block_m != t.block_n for t in tiles.values())  # the configurations CI never ran before
    # Tq, Tk past one tile and not multiples of it; GQA 2:1; left padding (every tile masked) or
    # none (tiles inside the causal / window band run without the mask).
    tensors = make_case(21, 1, 1, 2, 70, 135, dim, dtype, "span", padding)
    check_accuracy(*tensors, backend="triton", **options)


@pytest.mark.parametrize("arch, dim", [(80, 128), (90, 64)])
def test_attention_with_ieee_gpu_tiles(monkeypatch, arch, dim):
    """The 16-wide tiles IEEE float32 uses on a GPU (the interpreter's dots are IEEE float32 anyway)."""
    tiles = use_gpu_tiles(monkeypatch, arch, attention_triton.block_d_of(dim), torch.float32, "ieee")
    assert all(min(t.block_m, t.block_n) == 16 for t in tiles.values())
    tensors = make_case(24, 1, 1, 2, 40, 53, dim, torch.float32, "span", True)
    check_accuracy(*tensors, backend="triton", window=29, softcap=15.0)
    tensors = make_case(25, 1, 1, 1, 37, 37, dim, torch.float32, "span", False)
    check_accuracy(*tensors, backend="triton")


def test_autotune_prunes_to_the_tiles_listed_for_the_device_and_dtype(monkeypatch):
    """On a GPU, autotune keeps only the tiles the table lists for the device's architecture, the
    head-dim block, the dot precision and the input dtype (float32 has its own where halves spill)."""
    for capability, arch in (((8, 0), 80), ((9, 0), 90)):
        monkeypatch.setattr(attention_triton, "_capability", lambda index, capability=capability: capability)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        for kernel in attention_triton.KERNELS:
            tuner = attention_triton._autotuned(kernel)
            for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee")):
                for block_d in attention_triton.BLOCK_DS:
                    kept = tuner.early_config_prune(tuner.configs, {"Q": torch.empty(1, dtype=dtype)},
                                                    BLOCK_D=block_d, PRECISION=precision)
                    got = [attention_triton.Tile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                           for c in kept]
                    listed = attention_triton.gpu_tiles(kernel, arch, block_d, precision,
                                                        attention_triton.dtype_name(dtype))
                    assert sorted(got) == sorted(listed), (kernel, arch, dtype, precision, block_d)


@pytest.mark.parametrize("dim", [16, 8, 20])
def test_small_head_dims_run_in_the_kernel(dim):
    """Head dim 16 is the smallest tl.dot; 8 and 20 run masked in 16- and 32-wide blocks."""
    tensors = make_case(22, 1, 1, 2, 19, 29, dim, torch.float32, "span", True)
    check_accuracy(*tensors, backend="triton", window=11, softcap=7.0)


def test_head_dim_above_kernel_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(attention_module, "_WARNED", set())
    q, k, v, prefill, _, _ = make_case(23, 1, 1, 1, 5, 5, 320, torch.float32, "span")
    with pytest.warns(RuntimeWarning, match=r"head dim 320 exceeds the Triton kernel's maximum of 256.*reference"):
        out, mass = prefill_attention(q, k, v, prefill)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        again, _ = prefill_attention(q, k, v, prefill)
    assert torch.equal(out, again) and out.shape == q.shape
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: head dim 320"):
        prefill_attention(q, k, v, prefill, backend="triton")


@pytest.mark.parametrize("k", [1, 2, 3, 20])
def test_bitonic_selection_with_gpu_blocks(k):
    """The GPU's selection (tl.topk; one max reduction at k = 1) and its smallest vocabulary block."""
    block = ranking_triton.GPU_BLOCK_VS[0]
    vocab = block + 300  # two blocks, the second partial
    logits = make_logits(30 + k, 2, vocab, torch.float32, "some", 0.1)
    targets = torch.randint(0, vocab, (2, 3), generator=torch.Generator().manual_seed(k))
    values, indices, lse, rank, logprob, bad, bad_targets = topk_rank_triton(
        logits.to(DEVICE), k, targets.to(DEVICE), block_v=block, bitonic=True)
    assert not bad.any() and not bad_targets.any()
    assert_matches(type(topk_rank(logits, 1))(values, indices, lse, rank, logprob), logits, k, targets)


@pytest.mark.parametrize("bitonic", [False, True])
def test_merge_in_chunks_of_blocks(bitonic):
    """Stage 2 merging 4 blocks at a time with a running top-k (vocabularies past 64 blocks)."""
    logits = make_logits(40, 2, 700, torch.float32, "heavy", 0.2)
    targets = torch.randint(0, 700, (2, 5), generator=torch.Generator().manual_seed(4))
    values, indices, lse, rank, logprob, bad, _ = topk_rank_triton(logits.to(DEVICE), 7, targets.to(DEVICE),
                                                                  block_v=64, nb_pad=4, bitonic=bitonic)
    assert_matches(type(topk_rank(logits, 1))(values, indices, lse, rank, logprob), logits, 7, targets)


def test_deferred_checks_report_after_the_batch():
    good = torch.randn(3, 50)
    bad = torch.randn(2, 50)
    bad[1, 4] = float("nan")
    checks = TopKChecks()
    first = topk_rank(good.to(DEVICE), 3, checks=checks)  # nothing raised while recording
    topk_rank(bad.to(DEVICE), 3, checks=checks)
    assert first.indices.shape == (3, 3)
    with pytest.raises(ValueError, match=r"logits row 4 contains NaN"):  # rows numbered across the calls
        checks.raise_if_any()
    checks.raise_if_any()  # the records are gone

    targets = torch.tensor([[1, 2], [3, 50]])
    result = topk_rank(torch.randn(2, 50).to(DEVICE), 2, targets.to(DEVICE), checks=checks)
    assert result.target_rank[1, 1].item() == -1 and torch.isnan(result.target_logprob[1, 1])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 50\); targets\[1, 1\] = 50"):
        checks.raise_if_any()


def test_chunked_checks_once(monkeypatch):
    calls = []
    original = TopKChecks.raise_if_any
    monkeypatch.setattr(TopKChecks, "raise_if_any", lambda self: calls.append(1) or original(self))
    topk_rank_chunked(torch.randn(10, 40).to(DEVICE), 3, chunk_rows=3, backend="triton")
    assert calls == [1]


def _sparse_tensor(path, elements: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over a sparse file: only the pages a test writes or the kernel reads are ever
    backed by memory or disk."""
    nbytes = elements * torch.empty(0, dtype=dtype).element_size()
    with open(path, "wb") as handle:
        handle.truncate(nbytes)
    return torch.from_file(str(path), shared=True, size=elements, dtype=dtype)


def check_topk_rows_past_two_to_the_31(folder: Path) -> None:
    """Row 1 starts at element 2³¹ + 64: its offset wraps to row 0's neighbourhood in 32 bits."""
    vocab, stride = 300, 2**31 + 64
    storage = _sparse_tensor(folder / "logits", stride + vocab, torch.float32)
    logits = storage.as_strided((2, vocab), (stride, 1))
    rows = make_logits(50, 2, vocab, torch.float32, "none", 0.0)
    logits.copy_(rows)
    targets = torch.tensor([[5], [299]])
    result = topk_rank(logits, 4, targets, backend="triton")
    assert_matches(result, rows, 4, targets)


def check_attention_token_strides_past_two_to_the_31(folder: Path) -> None:
    """q/k/v tokens 2²⁸ elements apart, so that token · stride passes 2³¹ inside one tile: the
    row offsets must be formed in 64 bits (32-bit products wrap and read other tokens)."""
    attention_triton.POISON_OUTPUTS = False
    dim, length, token_stride = 16, 9, 2**28
    reference = make_case(24, 1, 1, 1, length, length, dim, torch.float32, "span")
    views = []
    for name, t in zip("qkv", reference[:3]):
        storage = _sparse_tensor(folder / name, token_stride * (length - 1) + dim, torch.float32)
        view = storage.as_strided((1, 1, length, dim), (0, 0, token_stride, 1))
        view.copy_(t.detach())
        views.append(view.requires_grad_())
    out, mass = prefill_attention(*views, reference[3], backend="triton")
    expected, expected_mass = prefill_attention(*(t.detach() for t in reference[:3]), reference[3], backend="torch")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass, expected_mass, atol=1e-6, rtol=1e-5)


def run_in_own_process(check: str, folder: Path) -> None:
    """Run ``check`` (a function of this module) in a fresh interpreter-mode process: a wrong
    64-bit offset reads far outside the mapped file, and the segfault it may cause must fail this
    test, not end the test session."""
    code = ("import sys; from pathlib import Path; from tests.kernels import test_gpu_paths as t; "
            f"t.{check}(Path(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPOSITORY, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, (f"{check} exited with status {result.returncode} (negative: killed by that "
                                    f"signal)\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


@pytest.mark.skipif(DEVICE.type == "cuda", reason="a stride-only launch over host memory (interpreter)")
@pytest.mark.parametrize("check", ["check_topk_rows_past_two_to_the_31",
                                   "check_attention_token_strides_past_two_to_the_31"])
def test_offsets_past_two_to_the_31(check, tmp_path):
    run_in_own_process(check, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("precision, allow_tf32", [(None, True), ("ieee", False)], ids=["tf32", "ieee"])
def test_gpu_fp32_precisions(monkeypatch, precision, allow_tf32):
    """float32 on a GPU: TF32 by default, within twice the error of plain PyTorch with TF32
    matmuls; IEEE when asked, within twice plain float32's error."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    tensors = make_case(25, 2, 2, 2, 300, 400, 128, torch.float32, "span", True, torch.device("cuda"))
    options = {} if precision is None else {"precision": precision}
    check_accuracy(*tensors, backend="triton", softcap=30.0, **options)
