"""Test set-up: kernel tests run on the GPU when there is one, else in Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before triton compiles anything, so it is set here, before any
test module imports deepalign's kernels.
"""

import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# GGUF conversions made by tests (SmolLM2, once) go to a cache of the test runs, not the user's.
os.environ.setdefault("DEEPALIGN_CACHE", os.path.join(tempfile.gettempdir(), "deepalign-test-cache"))

# The interpreter is slow: examples are few, shapes small, and there is no per-example deadline.
settings.register_profile(
    "deepalign", deadline=None, max_examples=25, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deepalign"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def world():
    """The synthetic world of seed 0 (shared by data, training and evaluation tests)."""
    from deepalign.data.synthetic import SyntheticWorld

    return SyntheticWorld.build(0)


@pytest.fixture(scope="module")
def tokenizer(world):
    return world.tokenizer()
