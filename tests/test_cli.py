"""The command line: `python -m starlabel demo` and `info`."""

import subprocess
import sys

import pytest

from starlabel.__main__ import main


def test_demo_runs_end_to_end_on_a_small_survey(capsys):
    assert main(["demo", "--n-train", "120", "--n-test", "20", "--n-pixels", "300"]) == 0
    out = capsys.readouterr().out
    assert "Label accuracy on 20 held-out spectra" in out
    assert "converged: 20/20" in out
    assert "speed-up" in out


def test_info_and_usage_errors():
    info = subprocess.run([sys.executable, "-m", "starlabel", "info"], capture_output=True, text=True)
    assert info.returncode == 0 and "instruction set loaded" in info.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
