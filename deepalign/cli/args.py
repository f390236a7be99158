"""Argument types for the ``deepalign`` command: each refuses a bad value at parse time, so argparse
prints ``argument --NAME: …`` and exits with code 2 before any work is done."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


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


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number ≥ 0, got {text!r}")
    return value


def probability(text: str) -> float:
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def int_in(low: int, high: int):
    def parse(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}")
        return value

    parse.__name__ = f"int_in_{low}_{high}"
    return parse


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


def _blocking_ancestor(path: Path) -> Path | None:
    for folder in path.parents:
        if folder.exists():
            return None if folder.is_dir() else folder
    return None


def output_file(text: str) -> Path:
    """A file to write: not a directory, and not under a file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory; give a file path")
    blocker = _blocking_ancestor(path)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text}: {blocker} is a file, so nothing can be written under it")
    return path


def output_dir(text: str) -> Path:
    """A folder to write into: not a file, and not under a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a file; give a folder")
    blocker = _blocking_ancestor(path)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text}: {blocker} is a file, so nothing can be written under it")
    return path
