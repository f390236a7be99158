"""Backend choice shared by every kernel.

A kernel has two implementations with identical semantics: a Triton kernel and a plain
PyTorch reference. ``backend="auto"`` picks Triton for CUDA tensors, Triton in its interpreter
for CPU tensors when ``TRITON_INTERPRET=1`` (how CI tests kernels without a GPU), and the
PyTorch reference for other CPU tensors. ``"triton"`` and ``"torch"`` force one path.

Triton's ``@jit`` decides at decoration time whether it interprets, so the modules holding
Triton kernels are imported lazily, on the first call that needs them: set
``TRITON_INTERPRET=1`` before that call (tests do it in ``conftest.py``).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> Literal["triton", "torch"]:
    """Return the implementation that runs for ``backend`` on tensors living on ``device``.

    Raises ``ValueError`` for an unknown backend, or for ``"triton"`` on a CPU tensor without
    the interpreter (there is nothing to run it on).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    runnable = device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    if backend == "triton":
        if not runnable:
            raise ValueError(
                f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                f"before the first kernel call; got tensors on {device}"
            )
        return "triton"
    return "triton" if runnable else "torch"


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Check that every given tensor lives on one device and return it.

    The message names each argument with its device, e.g. ``logits on cuda:0, targets on cpu``.
    """
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device; got {where}")
    return next(iter(devices))


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float_tensor(name: str, tensor: object, dims: int, layout: str) -> torch.Tensor:
    """Check that argument ``name`` is a float16/bfloat16/float32 tensor with ``dims`` dimensions
    (``layout`` names them in the message, e.g. ``"[N, V]"``) and return it."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must have shape {layout} ({dims} dimensions), got {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}")
    return tensor
