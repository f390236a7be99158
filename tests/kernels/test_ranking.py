"""topk_rank: Triton kernel (interpreter on CPU, real kernel on GPU) vs PyTorch reference vs float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepalign.kernels import NonFiniteLogitsError, topk_rank, topk_rank_chunked
from deepalign.kernels import ranking_triton as triton_module
from deepalign.kernels._dispatch import resolve_backend
from deepalign.kernels.ranking_triton import topk_rank_triton
from tests.helpers import DEVICE, oracle_topk_rank

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as garbage, so an element the kernel does not write shows up."""
    monkeypatch.setattr(triton_module, "POISON_OUTPUTS", True)


def make_logits(seed: int, n_rows: int, vocab: int, dtype: torch.dtype, ties: str, neg_inf: float) -> torch.Tensor:
    """Fresh random logits with a chosen amount of ties and of masked (-inf) entries."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, vocab, generator=gen, dtype=torch.float64) * 4
    if ties == "some":
        x = torch.round(x * 2) / 2
    elif ties == "heavy":
        x = torch.randint(-2, 3, (n_rows, vocab), generator=gen).to(torch.float64)
    elif ties == "signed-zero":
        x = torch.where(torch.rand(n_rows, vocab, generator=gen) < 0.5, -0.0, 0.0).to(torch.float64)
        x[:, ::3] = torch.randn(n_rows, (vocab + 2) // 3, generator=gen, dtype=torch.float64)
    x = torch.where(torch.rand(n_rows, vocab, generator=gen) < neg_inf, float("-inf"), x)
    if neg_inf >= 0.99:
        x[0] = float("-inf")  # a fully masked row
    return x.to(dtype)


def bits(values: torch.Tensor) -> torch.Tensor:
    return values.view({2: torch.int16, 4: torch.int32}[values.element_size()])


def assert_matches(result, logits, k, targets):
    """Exact order, indices and ranks against the reference and the float64 oracle; logsumexp and
    log-probabilities within twice PyTorch's own float32 error (plus a few ulps)."""
    reference = topk_rank(logits.cpu(), k, None if targets is None else targets.cpu(), backend="torch")
    oracle = oracle_topk_rank(logits, k, targets)
    assert torch.equal(result.indices.cpu(), reference.indices)
    assert torch.equal(result.indices.cpu(), oracle["indices"])
    assert torch.equal(bits(result.values.cpu()), bits(reference.values))  # bitwise: the sign of zero too
    assert torch.equal(result.values.cpu().double(), oracle["values"])
    assert result.values.dtype == logits.dtype and result.indices.dtype == torch.int64

    exact = oracle["logsumexp"]
    torch_error = (torch.logsumexp(logits.cpu().float(), 1).double() - exact).abs().nan_to_num(0)
    kernel = result.logsumexp.cpu().double()
    assert result.logsumexp.dtype == torch.float32
    assert torch.equal(torch.isneginf(kernel), torch.isneginf(exact))
    finite = torch.isfinite(exact)
    bound = 2 * torch_error + 4 * EPS32 * (1 + exact.abs())
    assert ((kernel - exact).abs()[finite] <= bound[finite]).all()
    if targets is None:
        assert result.target_rank is None and result.target_logprob is None
        return
    assert result.target_rank.shape == targets.shape and result.target_rank.dtype == torch.int64
    assert torch.equal(result.target_rank.cpu(), reference.target_rank)
    assert torch.equal(result.target_rank.cpu(), oracle["target_rank"])
    logprob = result.target_logprob.cpu().double()
    want = oracle["target_logprob"]
    assert torch.equal(torch.isneginf(logprob), torch.isneginf(want))
    finite = torch.isfinite(want)
    row_bound = bound.reshape(-1, *([1] * (targets.dim() - 1))).expand_as(want)
    assert ((logprob - want).abs()[finite] <= row_bound[finite] + 4 * EPS32 * want.abs()[finite]).all()


@st.composite
def topk_cases(draw, max_vocab: int = 3000):
    vocab = draw(st.integers(1, max_vocab))
    k = draw(st.integers(1, min(64, vocab)))
    k_padded = 1 << (k - 1).bit_length()
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        n_rows=draw(st.integers(1, 4)),
        vocab=vocab,
        k=k,
        dtype=draw(st.sampled_from(DTYPES)),
        ties=draw(st.sampled_from(["none", "some", "heavy", "signed-zero"])),
        neg_inf=draw(st.sampled_from([0.0, 0.0, 0.3, 0.95, 1.0])),
        targets=draw(st.sampled_from([None, "per-row", "matrix"])),
        num_targets=draw(st.integers(1, 6)),
        block_v=draw(st.sampled_from([None] + [b for b in (64, 128, 256, 512, 1024) if b >= k_padded])),
    )


def make_targets(case, vocab):
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    if case["targets"] is None:
        return None
    shape = (case["n_rows"],) if case["targets"] == "per-row" else (case["n_rows"], case["num_targets"])
    return torch.randint(0, vocab, shape, generator=gen)


@given(topk_cases())
def test_kernel_matches_reference_and_float64(case):
    logits = make_logits(case["seed"], case["n_rows"], case["vocab"], case["dtype"], case["ties"], case["neg_inf"])
    targets = make_targets(case, case["vocab"])
    logits_dev = logits.to(DEVICE)
    targets_dev = None if targets is None else targets.to(DEVICE)
    if case["block_v"] is None:
        result = topk_rank(logits_dev, case["k"], targets_dev, backend="triton")
    else:
        matrix = None if targets is None else targets_dev.reshape(case["n_rows"], -1)
        values, indices, lse, rank, logprob, bad, _ = topk_rank_triton(logits_dev, case["k"], matrix,
                                                                    block_v=case["block_v"])
        assert not bad.any()
        if targets is not None:
            rank, logprob = rank.reshape(targets.shape), logprob.reshape(targets.shape)
        result = type(topk_rank(logits, 1))(values, indices, lse, rank, logprob)
    assert_matches(result, logits, case["k"], targets)


@settings(max_examples=4)
@given(topk_cases(max_vocab=8192))
def test_reference_matches_float64(case):
    """The CPU path on its own, at vocabularies up to 8k."""
    logits = make_logits(case["seed"], case["n_rows"], case["vocab"], case["dtype"], case["ties"], case["neg_inf"])
    targets = make_targets(case, case["vocab"])
    assert_matches(topk_rank(logits, case["k"], targets, backend="torch"), logits, case["k"], targets)


@pytest.mark.parametrize("vocab, k, block_v", [(8192, 20, 1024), (5003, 64, 512)])
def test_kernel_large_vocab_many_blocks(vocab, k, block_v):
    logits = make_logits(7, 2, vocab, torch.float32, "some", 0.1)
    targets = torch.randint(0, vocab, (2, 3), generator=torch.Generator().manual_seed(3))
    values, indices, lse, rank, logprob, _, _ = topk_rank_triton(logits.to(DEVICE), k, targets.to(DEVICE),
                                                              block_v=block_v)
    assert_matches(type(topk_rank(logits, 1))(values, indices, lse, rank, logprob), logits, k, targets)


def test_bitonic_selection_matches_max_loop():
    """The GPU's default selection network (tl.topk), run once in the interpreter on a small case."""
    logits = make_logits(11, 1, 700, torch.float32, "some", 0.2)
    targets = torch.tensor([[3, 650]])
    loop = topk_rank_triton(logits.to(DEVICE), 20, targets.to(DEVICE), block_v=256, bitonic=False)
    bitonic = topk_rank_triton(logits.to(DEVICE), 20, targets.to(DEVICE), block_v=256, bitonic=True)
    for a, b in zip(loop, bitonic):
        assert torch.equal(a.cpu().nan_to_num(), b.cpu().nan_to_num())


@pytest.mark.parametrize("k, vocab, block_v, bitonic", [(3, 300, 64, False), (4, 2000, 1024, False),
                                                      (20, 700, 256, True), (64, 1500, 512, False)])
def test_prefilter_selects_what_the_full_network_selects(k, vocab, block_v, bitonic):
    """The candidate pre-filter (threshold from strided group maxima, compaction) against the full
    selection network and the oracles, with ties, signed zeros and -inf in the blocks."""
    logits = make_logits(k, 3, vocab, torch.float32, "some", 0.1)
    logits[1, ::7] = 0.0
    logits[1, 1::7] = -0.0
    targets = torch.randint(0, vocab, (3, 4), generator=torch.Generator().manual_seed(k))
    assert triton_module.prefilter_shape(1 << (k - 1).bit_length(), block_v) is not None
    filtered = topk_rank_triton(logits.to(DEVICE), k, targets.to(DEVICE), block_v=block_v, bitonic=bitonic,
                                prefilter=True)
    full = topk_rank_triton(logits.to(DEVICE), k, targets.to(DEVICE), block_v=block_v, bitonic=bitonic,
                            prefilter=False)
    for a, b in zip(filtered, full):
        assert torch.equal(a.cpu().nan_to_num(), b.cpu().nan_to_num())
    assert_matches(type(topk_rank(logits, 1))(*filtered[:5]), logits, k, targets)


def test_prefilter_falls_back_when_candidates_overflow():
    """Ten strided groups hold the largest logits: 80 keys pass the threshold, more than the 64
    candidate slots at k = 20, so the block takes the full network, and the result is still exact."""
    block = 1024
    groups, cap = triton_module.prefilter_shape(32, block)
    lanes = torch.arange(block)
    boosted = (lanes % groups) < 10
    assert int(boosted.sum()) > cap
    logits = torch.randn(2, block, generator=torch.Generator().manual_seed(5))
    logits[:, boosted] += 50
    result = topk_rank_triton(logits.to(DEVICE), 20, None, block_v=block, prefilter=True)
    assert_matches(type(topk_rank(logits, 1))(*result[:5]), logits, 20, None)


def test_prefilter_refused_where_it_cannot_run():
    logits = torch.randn(1, 256)
    with pytest.raises(ValueError, match="pre-filter needs k > 2"):
        topk_rank_triton(logits.to(DEVICE), 2, None, block_v=256, prefilter=True)
    with pytest.raises(ValueError, match="block_v ≥ 512"):
        topk_rank_triton(logits.to(DEVICE), 64, None, block_v=256, prefilter=True)


@given(topk_cases(max_vocab=1500))
def test_rank_index_invariant(case):
    """indices[n, r] == t  <=>  rank(t) == r for r < k: rank every top-k index and some others."""
    logits = make_logits(case["seed"], case["n_rows"], case["vocab"], case["dtype"], case["ties"], case["neg_inf"])
    k = case["k"]
    top = topk_rank(logits.to(DEVICE), k, backend="triton")
    extra = torch.randint(0, case["vocab"], (case["n_rows"], 4), generator=torch.Generator().manual_seed(case["seed"]))
    targets = torch.cat([top.indices.cpu(), extra], dim=1)
    ranked = topk_rank(logits.to(DEVICE), k, targets.to(DEVICE), backend="triton")
    ranks = ranked.target_rank.cpu()
    assert torch.equal(ranks[:, :k], torch.arange(k).expand(case["n_rows"], k))
    for n in range(case["n_rows"]):
        for t, r in zip(extra[n].tolist(), ranks[n, k:].tolist()):
            assert (r < k) == (t in top.indices[n].tolist())
            if r < k:
                assert top.indices[n, r].item() == t


@given(st.integers(0, 2**31 - 1), st.sampled_from(["affine", "cube", "shift"]), st.booleans())
def test_ranks_invariant_under_increasing_transforms(seed, transform, heavy_ties):
    """Integer-valued logits so that the transforms are exact: distinct stay distinct, ties stay ties."""
    gen = torch.Generator().manual_seed(seed)
    span = 3 if heavy_ties else 200
    x = torch.randint(-span, span + 1, (3, 900), generator=gen).to(torch.float32)
    y = {"affine": lambda v: 3 * v + 7, "cube": lambda v: v ** 3, "shift": lambda v: v - 1000}[transform](x)
    assert torch.equal(torch.unique(x, dim=None).numel() * torch.ones(1), torch.unique(y).numel() * torch.ones(1))
    targets = torch.randint(0, 900, (3, 5), generator=gen)
    a = topk_rank(x.to(DEVICE), 16, targets.to(DEVICE), backend="triton")
    b = topk_rank(y.to(DEVICE), 16, targets.to(DEVICE), backend="triton")
    assert torch.equal(a.target_rank, b.target_rank)
    assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_row_is_named(backend, bad_value):
    logits = torch.randn(5, 300)
    logits[3, 17] = bad_value
    logits[4, 0] = bad_value
    device = DEVICE if backend == "triton" else torch.device("cpu")
    with pytest.raises(NonFiniteLogitsError, match=r"logits row 3 contains NaN or \+inf \(and 1 other rows\)") as info:
        topk_rank(logits.to(device), 4, backend=backend)
    assert info.value.row == 3


def test_negative_infinity_is_legal_and_has_zero_probability():
    logits = torch.full((2, 50), float("-inf"))
    logits[0, 7] = 1.0
    result = topk_rank(logits.to(DEVICE), 3, torch.tensor([[7, 8], [0, 49]]).to(DEVICE), backend="triton")
    assert result.indices.tolist() == [[7, 0, 1], [0, 1, 2]]
    assert result.target_rank.tolist() == [[0, 8], [0, 49]]
    assert result.target_logprob[0, 0].item() == 0.0
    assert torch.isneginf(result.target_logprob[0, 1]) and torch.isneginf(result.target_logprob[1]).all()
    assert result.logsumexp[0].item() == 1.0 and torch.isneginf(result.logsumexp[1])


def test_chunked_matches_unchunked_and_locates_bad_positions():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 7, 120, generator=gen)
    targets = torch.randint(0, 120, (2, 7, 2), generator=gen)
    chunked = topk_rank_chunked(logits.to(DEVICE), 5, targets.to(DEVICE), chunk_rows=3, backend="triton")
    whole = topk_rank(logits.reshape(14, 120), 5, targets.reshape(14, 2), backend="torch")
    assert chunked.values.shape == (2, 7, 5) and chunked.logsumexp.shape == (2, 7)
    assert torch.equal(chunked.indices.cpu().reshape(14, 5), whole.indices)
    assert torch.equal(chunked.target_rank.cpu().reshape(14, 2), whole.target_rank)
    per_position = topk_rank_chunked(logits, 5, targets[..., 0], chunk_rows=4)
    assert torch.equal(per_position.target_rank, chunked.target_rank[..., 0].cpu())
    logits[1, 4, 9] = float("nan")
    with pytest.raises(ValueError, match=r"position \(1, 4\) \(flat row 11\)"):
        topk_rank_chunked(logits, 5, chunk_rows=3)


def test_empty_batch():
    result = topk_rank(torch.randn(0, 10), 3, torch.zeros(0, 2, dtype=torch.long))
    assert result.values.shape == (0, 3) and result.target_rank.shape == (0, 2)


def test_non_contiguous_rows_and_int32_targets():
    base = torch.randn(200, 6)
    logits = base.t()  # [6, 200], last stride 6
    targets = torch.randint(0, 200, (6,), dtype=torch.int32)
    result = topk_rank(logits.to(DEVICE), 10, targets.to(DEVICE), backend="triton")
    assert_matches(result, logits, 10, targets.long())


@pytest.mark.parametrize(
    "logits, k, targets, error, message",
    [
        (torch.randn(3, 10, 2), 2, None, ValueError, r"logits must have shape \[N, V\]"),
        (torch.randn(10), 2, None, ValueError, r"logits must have shape \[N, V\]"),
        (torch.randint(0, 5, (3, 10)), 2, None, TypeError, "logits must be float16, bfloat16 or float32"),
        (torch.randn(3, 10, dtype=torch.float64), 2, None, TypeError, "logits must be float16"),
        ([[1.0, 2.0]], 1, None, TypeError, "logits must be a torch.Tensor"),
        (torch.randn(3, 0), 1, None, ValueError, "empty vocabulary"),
        (torch.randn(3, 10), 0, None, ValueError, r"k must be in \[1, 64\]"),
        (torch.randn(3, 100), 65, None, ValueError, r"k must be in \[1, 64\]"),
        (torch.randn(3, 10), 11, None, ValueError, "k must be at most the vocabulary size V = 10"),
        (torch.randn(3, 10), 2.0, None, TypeError, "k must be an int"),
        (torch.randn(3, 10), True, None, TypeError, "k must be an int"),
        (torch.randn(3, 10), 2, torch.tensor([1.0, 2.0, 3.0]), TypeError, "targets must be an integer tensor"),
        (torch.randn(3, 10), 2, torch.tensor([1, 2]), ValueError, r"targets must have shape \[N\] or \[N, M\] with N = 3"),
        (torch.randn(3, 10), 2, torch.zeros(3, 1, 1, dtype=torch.long), ValueError, "targets must have shape"),
        (torch.randn(3, 10), 2, torch.zeros(3, 0, dtype=torch.long), ValueError, "M = 0 targets"),
        (torch.randn(3, 10), 2, torch.tensor([1, 10, 3]), ValueError, r"targets must lie in \[0, 10\); targets\[1\] = 10"),
        (torch.randn(3, 10), 2, torch.tensor([[1], [-1], [3]]), ValueError, r"targets\[1, 0\] = -1"),
    ],
)
def test_bad_input_names_the_argument(logits, k, targets, error, message):
    with pytest.raises(error, match=message):
        topk_rank(logits, k, targets)


def test_bad_backend_and_devices(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        topk_rank(torch.randn(2, 5), 1, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.device("cpu")) == "triton"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.gpu
def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="logits on cuda:0, targets on cpu"):
        topk_rank(torch.randn(2, 5, device="cuda"), 1, torch.tensor([0, 1]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernel_large_vocab(dtype):
    """Real kernel at a realistic vocabulary, every dtype (bf16 included), default block choice."""
    logits = make_logits(1, 64, 128_256, dtype, "some", 0.01).cuda()
    targets = torch.randint(0, 128_256, (64, 2), generator=torch.Generator().manual_seed(2)).cuda()
    assert_matches(topk_rank(logits, 20, targets), logits.cpu(), 20, targets.cpu())


def test_chunked_with_an_empty_leading_shape():
    result = topk_rank_chunked(torch.randn(0, 5, 10), 3, torch.zeros(0, 5, dtype=torch.long))
    assert result.values.shape == (0, 5, 3) and result.target_rank.shape == (0, 5)
    result = topk_rank_chunked(torch.randn(0, 10), 3, torch.zeros(0, 2, dtype=torch.long))
    assert result.target_rank.shape == (0, 2)
