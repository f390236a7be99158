"""The ``deepalign`` command."""

import subprocess
import sys

import pytest

from deepalign.cli import main


def test_selfcheck_passes_and_prints_its_table(capsys):
    assert main(["selfcheck", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    assert out.count(" ok ") >= 3


def test_unknown_command_is_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fly"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_module_entry_point_prints_version():
    out = subprocess.run([sys.executable, "-m", "deepalign", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("deepalign ")
