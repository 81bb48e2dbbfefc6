"""Shared test set-up: one thread per process, no hub access, the CLI run in-process or as a subprocess."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@dataclass
class Result:
    exit_code: int
    output: str


from keys_recording import recorder  # noqa: E402,F401  (a fixture)


@pytest.fixture
def cli():
    """Run ``rlkit ARGS`` in-process; returns exit code and combined output."""
    from typer.testing import CliRunner

    from rlkit.cli import app

    runner = CliRunner()

    def run(*args: str) -> Result:
        r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return Result(r.exit_code, r.output)  # click 8.2+: output holds stdout and stderr

    return run


@pytest.fixture
def rlkit_proc():
    """Run the installed ``rlkit`` console script as a real subprocess."""

    def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        exe = os.path.join(os.path.dirname(sys.executable), "rlkit")
        return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout)

    return run


def assert_clean_error(result, *needles: str) -> None:
    """A bad-input failure: non-zero exit, one 'error:' line naming the problem, no traceback."""
    out = result.output if hasattr(result, "output") else result.stdout + result.stderr
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for n in needles:
        assert n in errors[0], errors[0]
