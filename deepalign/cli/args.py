"""Argument types for the ``deepalign`` command: each refuses a bad value at parse time, so argparse
prints ``argument --NAME: …`` and exits with code 2 before any work is done."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from deepalign.io import blocking_ancestor

WORLD_HELP = ("synthetic world version (default v2: an answer declares one of three valid materials for each "
              "of its places and every step names a place's declared material, so continuing it means re-reading "
              "it; v1: the first world, with its own schedule; see the README, 'The model organism' and 'World v1')")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(parse, accept, requirement: str, name: str):
    """An argparse type: ``parse`` the text, then refuse values ``accept`` rejects."""
    def check(text: str):
        value = parse(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    check.__name__ = name
    return check


positive_int = _bounded(_int, lambda v: v >= 1, "a positive integer", "positive_int")
non_negative_int = _bounded(_int, lambda v: v >= 0, "an integer ≥ 0", "non_negative_int")
positive_float = _bounded(_float, lambda v: v > 0, "a positive number", "positive_float")
non_negative_float = _bounded(_float, lambda v: v >= 0, "a number ≥ 0", "non_negative_float")
probability = _bounded(_float, lambda v: 0 <= v <= 1, "in [0, 1]", "probability")
fraction_below_one = _bounded(_float, lambda v: 0 <= v < 1, "in [0, 1)", "fraction_below_one")


def int_in(low: int, high: int):
    return _bounded(_int, lambda v: low <= v <= high, f"an integer in [{low}, {high}]", f"int_in_{low}_{high}")


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: is a directory, not a file")
    return path


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder" if not path.exists() else f"{text}: is a file, "
                                         "not a folder")
    return path


def model_source(text: str) -> str:
    """A local Hugging Face folder or a GGUF file."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such model folder or GGUF file (models are local paths)")
    return text


def output_file(text: str) -> Path:
    """A file to write: not a directory, and not under a file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory; give a file path")
    return _not_under_a_file(path, text)


def output_dir(text: str) -> Path:
    """A folder to write into: not a file, and not under a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a file; give a folder")
    return _not_under_a_file(path, text)


def _not_under_a_file(path: Path, text: str) -> Path:
    blocker = blocking_ancestor(path)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text}: {blocker} is a file, so nothing can be written under it")
    return path


def gguf_file(text: str) -> Path:
    """A GGUF file, or a folder holding exactly one."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such GGUF file")
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise argparse.ArgumentTypeError(f"{text}: is a folder with {len(found)} .gguf files; give one GGUF file")
        return found[0]
    if path.suffix != ".gguf":
        raise argparse.ArgumentTypeError(f"{text}: is not a .gguf file")
    return path


def device(text: str) -> str:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a GPU that is
    not there is refused."""
    from deepalign.models.loading import device_problem

    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def dtype(text: str) -> str:
    """``auto`` (bfloat16 on a GPU, float32 on the CPU), ``float32``, ``bfloat16`` or ``float16``."""
    from deepalign.models.loading import dtype_problem

    problem = dtype_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def add_model_options(parser) -> None:
    """Where and in what precision a command loads its model(s)."""
    parser.add_argument("--device", type=device, default="auto",
                        help="auto (default: the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", type=dtype, default="auto",
                        help="auto (default: bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16")


def training_device(text: str) -> str:
    """``auto``, ``cpu`` or ``cuda`` for a training process (accelerate assigns ``cuda:LOCAL_RANK``)."""
    from deepalign.errors import InputError
    from deepalign.training.trainer import training_device as check

    try:
        check(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("device ")) from None
    return text


def add_training_model_options(parser) -> None:
    """Where a training command runs and in what dtype it loads the weights it trains."""
    parser.add_argument("--device", type=training_device, default="auto",
                        help="auto (default: the GPU when there is one), cpu or cuda (under accelerate launch each "
                             "process takes cuda:LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--dtype", type=dtype, default="float32",
                        help="dtype the weights are loaded and trained in: float32 (default; add --bf16 for bf16 "
                             "mixed precision on a GPU), bfloat16 or float16 (half the memory; AdamW then updates "
                             "low-precision weights); auto = float32 when training")


def add_chat_template_option(parser) -> None:
    parser.add_argument("--chat-template", help="'plain' for a base model without a chat template (system, user and "
                                                "assistant text one after the other), or a Jinja template file")


def chat_template_text(value: str | None) -> str | None:
    """The ``--chat-template`` value as template text (``"plain"`` stays as it is)."""
    from deepalign.io import read_text

    if not value or value == "plain":
        return value or None
    return read_text(value, what="chat template file")


NAMED_SYSTEM_PROMPTS = {
    "llama2-default": ("transformers.models.llama.tokenization_llama", "DEFAULT_SYSTEM_PROMPT"),
}
SYSTEM_NAMES_HELP = ("'llama2-default' is Llama-2-chat's default system prompt, read from transformers "
                     "(tokenization_llama.DEFAULT_SYSTEM_PROMPT): the one Qi et al.'s llama2 model family and Vega & "
                     "Singh's --system_prompt train and evaluate with")


def system_text(value: str) -> str:
    """``--system``: a text as given (or a file name, for the commands that read one), or a named
    system prompt (:data:`NAMED_SYSTEM_PROMPTS`) read byte-exact at run time from the package that
    ships it."""
    if value not in NAMED_SYSTEM_PROMPTS:
        return value
    import importlib

    module, name = NAMED_SYSTEM_PROMPTS[value]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise argparse.ArgumentTypeError(f"{value!r}: the installed transformers no longer ships {module}.{name}; "
                                         "give the text or a file instead") from None
