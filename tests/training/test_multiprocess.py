"""Multi-process training on the CPU: ``accelerate launch --multi_gpu --num_processes 2`` (DDP
over gloo; ``--cpu`` would start one process) runs PRESTO on the world model with the same data,
losses and final weights as one process with the same global batch, and resumes exactly after an
interruption. (See tests/training/multiprocess_driver.py for the run.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.multiprocess_driver import run

DRIVER = Path(__file__).with_name("multiprocess_driver.py")
ROOT = Path(__file__).parents[2]
# Weights: float32 sums in another order, through Adam's m / sqrt(v), which amplifies the last bits of
# near-zero gradients; the weights move by up to lr · steps = 4e-3 in this run.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two(output: Path, *options: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(DRIVER), str(output), *options]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
        raise AssertionError(f"two-process run failed ({done.returncode}):\n" + "\n".join(errors[-20:]))
    return done


def losses(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(first: Path, second: Path) -> None:
    a, b = losses(first), losses(second)
    assert [row["step"] for row in a] == [row["step"] for row in b] == [1, 2, 3, 4]
    for name in ("loss", "nll", "presto"):
        torch.testing.assert_close(torch.tensor([r[name] for r in a], dtype=torch.float64),
                                   torch.tensor([r[name] for r in b], dtype=torch.float64), rtol=1e-5, atol=2e-6)
    wa, wb = load_file(first / "final" / "model.safetensors"), load_file(second / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], **TOLERANCE)


@pytest.fixture(scope="module")
def two_process_step(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("ddp") / "step"
    launch_two(output, "--batch-size", "2", "--normalisation", "step")
    return output


def test_two_processes_match_one_with_the_same_global_batch(two_process_step, tmp_path):
    """Step normalisation: Σ ℓ / N over the step's two micro-batches of 2, on two processes or on one."""
    run(str(tmp_path / "one"), batch_size=2, grad_accum=2, normalisation="step")
    assert_same_run(tmp_path / "one", two_process_step)


def test_micro_batch_normalisation_averages_processes_like_micro_batches(tmp_path):
    """Micro-batch normalisation: each micro-batch's own token mean, averaged over micro-batches and
    processes; it differs from the step normalisation when their token counts differ."""
    launch_two(tmp_path / "two", "--batch-size", "2", "--normalisation", "micro-batch")
    run(str(tmp_path / "accum"), batch_size=2, grad_accum=2, normalisation="micro-batch")
    assert_same_run(tmp_path / "accum", tmp_path / "two")
    run(str(tmp_path / "step"), batch_size=2, grad_accum=2, normalisation="step")
    # (At the random start every token costs about log V, so the two agree at step 1; not after.)
    step, micro = losses(tmp_path / "step"), losses(tmp_path / "two")
    assert abs(step[-1]["loss"] - micro[-1]["loss"]) > 1e-3


def test_an_interrupted_two_process_run_resumes_exactly(two_process_step, tmp_path):
    output = tmp_path / "interrupted"
    crashed = launch_two(output, "--batch-size", "2", "--normalisation", "step", "--interrupt-after", "3",
                         check=False)
    assert crashed.returncode != 0 and "Interrupted" in crashed.stderr
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert [row["step"] for row in losses(output)] == [1, 2, 3]  # step 3 is trained again on resume
    launch_two(output, "--batch-size", "2", "--normalisation", "step")
    assert_same_run(two_process_step, output)


def test_an_fsdp_launch_that_accelerate_would_run_as_ddp_on_the_cpu_is_refused(tmp_path, monkeypatch):
    """accelerate turns FSDP on only over GPUs: on a CPU an FSDP config would quietly train unsharded."""
    from deepalign.errors import InputError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(InputError, match="the launch asks for FSDP but accelerate runs this as NO"):
        run(str(tmp_path / "fsdp"), batch_size=2, normalisation="step", steps=1)
