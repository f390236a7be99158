"""prefill_attention: Triton kernels (interpreter on CPU, real on GPU) and the PyTorch reference
against a float64 oracle, with the FlashAttention accuracy rule: each of out, mass, dq, dk, dv has
at most twice the error of plain PyTorch attention computed in the inputs' own precision."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from deepalign.kernels import prefill_attention
from deepalign.kernels import attention_triton as triton_module
from tests.helpers import DEVICE, plain_prefill_attention

NAMES = ("out", "mass", "dq", "dk", "dv")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(triton_module, "POISON_OUTPUTS", True)


def make_case(seed, batch, heads_kv, group, num_queries, num_keys, dim, dtype, prefill="random", padding=False,
              device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    heads_q = heads_kv * group

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device).requires_grad_()

    q, k, v = rand(batch, heads_q, num_queries, dim), rand(batch, heads_kv, num_keys, dim), rand(batch, heads_kv, num_keys, dim)
    if prefill == "random":
        prefill_mask = torch.rand(batch, num_keys, generator=gen) < 0.4
    elif prefill == "span":  # a contiguous prefill span, as in a chat
        prefill_mask = torch.zeros(batch, num_keys, dtype=torch.bool)
        start = num_keys // 3
        prefill_mask[:, start:start + max(1, num_keys // 4)] = True
    else:
        prefill_mask = torch.full((batch, num_keys), prefill == "all")
    key_padding_mask = None
    if padding:  # left padding of a different length per row
        lengths = torch.randint(0, num_keys // 2 + 1, (batch,), generator=gen)
        key_padding_mask = torch.arange(num_keys)[None, :] >= lengths[:, None]
        key_padding_mask = key_padding_mask.to(device)
    grads = (torch.randn(batch, heads_q, num_queries, dim, generator=gen).to(dtype).to(device),
             torch.randn(batch, heads_q, num_queries, generator=gen).to(device))
    return q, k, v, prefill_mask.to(device), key_padding_mask, grads


def outputs_and_grads(fn, q, k, v, grads):
    """(out, mass, dq, dk, dv) as float64 CPU tensors; each keeps the dtype it was computed in as `.computed_in`."""
    out, mass = fn()
    dq, dk, dv = torch.autograd.grad((out.float() * grads[0].float()).sum() + (mass.float() * grads[1]).sum(), (q, k, v))
    results = []
    for t in (out, mass, dq, dk, dv):
        as_double = t.detach().double().cpu()
        as_double.computed_in = t.dtype
        results.append(as_double)
    return results


def error_floor(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """The absolute error below which a kernel is not judged: one unit of `dtype`'s precision (its machine
    epsilon) at the exact values' largest magnitude, and never under 1e-5 of it.

    A result stored in `dtype` is rounded once, by up to half an ulp, so where plain PyTorch happens to
    land within an ulp (a few keys, an fp16 dq of 1.5 ± 2^-10), twice its error is no bound at all; the
    FlashAttention tests add the same kind of floor (the rounding of the reference in the test dtype).
    The 1e-5 part (~80 float32 ulps) covers rows that see a single key: there P is one-hot and the exact
    dS = P(dP − Δ) is 0, which plain PyTorch reproduces exactly (its softmax backward subtracts equal
    numbers) while FlashAttention's Δ = rowsum(dO∘O) rounds differently from dP.
    Real kernel bugs give errors orders of magnitude above this floor."""
    scale = max(1.0, exact.abs().max().item())
    return max(1e-5, torch.finfo(dtype).eps) * scale


def check_accuracy(q, k, v, prefill_mask, key_padding_mask, grads, backend, **options):
    kwargs = dict(key_padding_mask=key_padding_mask, **options)
    got = outputs_and_grads(lambda: prefill_attention(q, k, v, prefill_mask, backend=backend, **kwargs), q, k, v, grads)
    exact = outputs_and_grads(lambda: plain_prefill_attention(q, k, v, prefill_mask, dtype=torch.float64, **_plain(kwargs)),
                              q, k, v, grads)
    plain = outputs_and_grads(lambda: plain_prefill_attention(q, k, v, prefill_mask, **_plain(kwargs)), q, k, v, grads)
    for name, g, e, p in zip(NAMES, got, exact, plain):
        assert torch.isfinite(g).all(), f"{name} has non-finite entries"
        kernel_error = (g - e).abs().max().item()
        plain_error = (p - e).abs().max().item()
        floor = error_floor(e, g.computed_in)
        assert kernel_error <= 2 * plain_error + floor, \
            f"{name}: error {kernel_error:.3g} vs plain {plain_error:.3g} (floor {floor:.3g})"
    return got


def _plain(kwargs):
    options = dict(kwargs)
    options.pop("precision", None)  # the kernel's dot precision; plain PyTorch follows torch's own setting
    if "softmax_scale" in options:
        options["scale"] = options.pop("softmax_scale")
    return options


@st.composite
def attention_cases(draw):
    num_queries = draw(st.integers(1, 70))
    num_keys = draw(st.one_of(st.integers(num_queries, 90), st.integers(1, 90)))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, 2)),
        heads_kv=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2, 3])),
        num_queries=num_queries,
        num_keys=num_keys,
        dim=draw(st.sampled_from([32, 40, 64, 80])),
        dtype=draw(st.sampled_from([torch.float16, torch.float32])),
        prefill=draw(st.sampled_from(["random", "span", "span", "none", "all"])),
        padding=draw(st.booleans()),
        causal=draw(st.sampled_from([True, True, False])),
        window=draw(st.sampled_from([None, None, 1, 7, 33, 70])),  # 70 > 32 + 32 − 1: whole tiles inside the band
        softcap=draw(st.sampled_from([None, None, 2.5, 30.0])),
    )


def _run_case(case, backend, device):
    options = dict(causal=case["causal"], window=case["window"] if case["causal"] else None, softcap=case["softcap"])
    tensors = make_case(case["seed"], case["batch"], case["heads_kv"], case["group"], case["num_queries"],
                        case["num_keys"], case["dim"], case["dtype"], case["prefill"], case["padding"], device)
    check_accuracy(*tensors, backend=backend, **options)


@settings(max_examples=20)
@given(attention_cases())
@example(dict(seed=348224, batch=1, heads_kv=1, group=3, num_queries=20, num_keys=9, dim=40, dtype=torch.float16,
              prefill="span", padding=True, causal=True, window=None, softcap=None))  # CI 2026-12-02: fp16 dq within 2.5 ulp
def test_kernel_accuracy_random_shapes(case):
    _run_case(case, "triton", DEVICE)


@settings(max_examples=12)
@given(attention_cases())
def test_reference_accuracy_random_shapes(case):
    _run_case(case, "torch", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(causal=False),
        dict(window=5),
        dict(softcap=3.0),
        dict(softmax_scale=0.3, window=16, softcap=20.0),
    ],
    ids=["causal", "full", "window", "softcap", "all-options"],
)
def test_named_configurations(backend, options):
    device = DEVICE if backend == "triton" else torch.device("cpu")
    tensors = make_case(1, 2, 2, 2, 37, 53, 64, torch.float32, "span", True, device)
    check_accuracy(*tensors, backend=backend, **options)


@pytest.mark.parametrize("dim", [128, 200, 256])
def test_large_head_dims(dim):
    """Head dims up to 256 (Gemma), including one that is not a power of two."""
    tensors = make_case(6, 1, 1, 2, 19, 23, dim, torch.float32, "span", True)
    check_accuracy(*tensors, backend="triton", window=9, softcap=15.0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_rows_give_zeros_not_nan(backend):
    """Queries with no visible key (fully padded row; queries before the first key under
    bottom-right causal masking with Tq > Tk) get out = 0, mass = 0 and zero gradients."""
    device = DEVICE if backend == "triton" else torch.device("cpu")
    q, k, v, prefill_mask, _, grads = make_case(2, 2, 1, 2, 40, 30, 32, torch.float32, "all", False, device)
    key_padding_mask = torch.ones(2, 30, dtype=torch.bool, device=device)
    key_padding_mask[1] = False
    out, mass = prefill_attention(q, k, v, prefill_mask, key_padding_mask=key_padding_mask, backend=backend)
    assert (out[1] == 0).all() and (mass[1] == 0).all()
    assert (out[0, :, :10] == 0).all() and (mass[0, :, :10] == 0).all()  # queries 0..9 see no key
    assert torch.allclose(mass[0, :, 10:], torch.ones_like(mass[0, :, 10:]))  # all keys are prefill
    dq, dk, dv = torch.autograd.grad((out * grads[0]).sum() + (mass * grads[1]).sum(), (q, k, v))
    assert torch.isfinite(dq).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


def test_mass_only_gradient_and_out_only_gradient():
    """Gradients flow from either output alone (the other's upstream gradient is None)."""
    q, k, v, prefill_mask, _, _ = make_case(3, 1, 2, 2, 33, 33, 32, torch.float32, "span")
    for backend in ("triton", "torch"):
        out, mass = prefill_attention(q, k, v, prefill_mask, backend=backend)
        grads_mass = torch.autograd.grad(mass.sum(), (q, k, v), allow_unused=True, materialize_grads=True)
        out, mass = prefill_attention(q, k, v, prefill_mask, backend=backend)
        grads_out = torch.autograd.grad(out.sum(), (q, k, v))
        if backend == "triton":
            kernel = grads_mass, grads_out
        else:
            for a, b in zip(kernel[0] + kernel[1], grads_mass + grads_out):
                assert torch.allclose(a.cpu(), b, atol=1e-5, rtol=1e-4)
    assert grads_mass[2].abs().max() == 0  # mass does not depend on v
    assert grads_mass[0].abs().max() > 0


def test_non_contiguous_inputs_as_transformers_passes_them():
    """Hugging Face passes q, k, v as transposes of [B, T, H, D] projections."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 21, 4, 32, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 21, 2, 32, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 21, 2, 32, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
    prefill_mask = (torch.arange(21) % 3 == 0).expand(2, 21).to(DEVICE)
    grads = (torch.randn(2, 4, 21, 32, generator=gen).to(DEVICE), torch.randn(2, 4, 21, generator=gen).to(DEVICE))
    check_accuracy(q, k, v, prefill_mask, None, grads, backend="triton")


def test_reference_never_builds_the_full_score_matrix(monkeypatch):
    """The reference works on query chunks: no score matrix has more than chunk_size query rows."""
    from deepalign.kernels import attention as module

    seen = []
    original = module._reference_chunk

    def spy(q_chunk, *args):
        seen.append(q_chunk.shape[3])
        return original(q_chunk, *args)

    monkeypatch.setattr(module, "_reference_chunk", spy)
    q, k, v, prefill_mask, _, _ = make_case(5, 1, 1, 1, 300, 300, 32, torch.float32, "span", device=torch.device("cpu"))
    out, mass = module.prefill_attention_reference(q, k, v, prefill_mask, None,
                                                   module._validate(q, k, v, prefill_mask, True, None, None, None, None),
                                                   chunk_size=64)
    mass.sum().backward()
    assert len(seen) == 2 * 5 and max(seen) <= 64  # 5 chunks, each run again in backward


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(q=torch.randn(2, 4, 8)), ValueError, r"q must have shape \[B, H, T, D\] \(4 dimensions\)"),
        (dict(k=torch.randn(2, 3, 8, 32), v=torch.randn(2, 3, 8, 32)), ValueError, r"query heads \(4\) must be a multiple of the number of key/value heads \(3\)"),
        (dict(v=torch.randn(2, 2, 9, 32)), ValueError, "k and v must have the same shape"),
        (dict(k=torch.randn(3, 2, 8, 32), v=torch.randn(3, 2, 8, 32)), ValueError, "k has batch size 3 but q has 2"),
        (dict(k=torch.randn(2, 2, 8, 64), v=torch.randn(2, 2, 8, 64)), ValueError, "head dim 64 but q has 32"),
        (dict(q=torch.randn(2, 4, 8, 0), k=torch.randn(2, 2, 8, 0), v=torch.randn(2, 2, 8, 0)), ValueError,
         r"head dim D must be at least 1, got 0"),
        (dict(precision="fp16"), ValueError, r"precision must be one of \('tf32', 'ieee'\) or None"),
        (dict(q=torch.randn(2, 4, 8, 32).double()), TypeError, "q must be float16, bfloat16 or float32"),
        (dict(v=torch.randn(2, 2, 8, 32).half()), TypeError, "must share one dtype"),
        (dict(prefill_mask=torch.ones(2, 8)), TypeError, "prefill_mask must be a bool tensor, got torch.float32"),
        (dict(prefill_mask=torch.ones(2, 9, dtype=torch.bool)), ValueError, r"prefill_mask must have shape \[B, Tk\] = \(2, 8\)"),
        (dict(key_padding_mask=torch.ones(1, 8, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
        (dict(window=0), ValueError, "window must be a positive int"),
        (dict(window=4, causal=False), ValueError, "window needs causal=True"),
        (dict(softcap=-1.0), ValueError, "softcap must be a positive finite number"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a positive finite number"),
        (dict(backend="flash"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(change, error, message):
    args = dict(q=torch.randn(2, 4, 8, 32), k=torch.randn(2, 2, 8, 32), v=torch.randn(2, 2, 8, 32),
                prefill_mask=torch.zeros(2, 8, dtype=torch.bool))
    args.update(change)
    positional = [args.pop(name) for name in ("q", "k", "v", "prefill_mask")]
    with pytest.raises(error, match=message):
        prefill_attention(*positional, **args)


@pytest.mark.gpu
def test_mixed_devices_are_rejected():
    q = torch.randn(1, 2, 8, 32, device="cuda")
    with pytest.raises(ValueError, match="q on cuda:0, k on cpu"):
        prefill_attention(q, torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.zeros(1, 8, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_gpu_kernel_bf16_fp16(dtype, dim):
    """The real kernel, in half precisions (bf16 only runs here), at a realistic length."""
    tensors = make_case(9, 2, 2, 4, 700, 1100, dim, dtype, "span", True, torch.device("cuda"))
    check_accuracy(*tensors, backend="triton")
    check_accuracy(*tensors, backend="triton", window=257, softcap=50.0)
