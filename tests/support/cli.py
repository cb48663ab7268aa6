"""The ``fedtune`` command run in this process (typer's CliRunner), as a shell starts it:
``sys.argv`` as the console script sees it, and a narrow terminal (as in CI logs), so
messages must still come out whole. A test of the process itself (its exit on a signal,
its children) runs the real one instead (tests/deploy/harness.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner


def run_cli(*args: str, cwd: Path | None = None) -> Result:
    """``fedtune ARGS`` (in folder ``cwd``): exit code, stdout and stderr apart; an
    exception the command does not turn into an exit status fails the test (as a
    traceback would)."""
    from fedtune import cli

    with pytest.MonkeyPatch.context() as patch:
        if cwd is not None:
            patch.chdir(cwd)
        patch.setattr(sys, "argv", ["fedtune", *args])
        patch.setenv("COLUMNS", "60")
        return CliRunner().invoke(cli.app, list(args), prog_name="fedtune",
                                  catch_exceptions=False)
