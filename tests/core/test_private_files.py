"""A run directory and what fedtune writes into it are its owner's only (folder 0700,
files 0600), whatever the umask of the process that writes them: a permissive 022 here,
as a login shell has."""

import os
import stat

import pytest

from fedtune.core.files import open_private_append, private_folder, write_private
from fedtune.runs.rundir import RunRecorder, new_run_dir


@pytest.fixture(autouse=True)
def _permissive_umask():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_run_directory_and_its_record_are_private(tmp_path):
    run_dir = new_run_dir(tmp_path / "runs", "deployment")
    recorder = RunRecorder(run_dir, {"run": {"name": "deployment"}})
    recorder.log_client({"round": 1})
    recorder.log_round({"round": 1, "eval_loss": 3.0})
    recorder.close("completed")
    assert _mode(run_dir) == 0o700
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"summary.json", "scenario.json", "metrics.jsonl"}
    assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}


def test_private_writes_tighten_what_was_there(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    (folder / "pins.json").write_text("{}")
    os.chmod(folder / "pins.json", 0o644)
    private_folder(folder)
    write_private(folder / "pins.json", "{\"a\": 1}")
    with open_private_append(folder / "log") as handle:
        handle.write("x\n")
    assert _mode(folder) == 0o700
    assert _mode(folder / "pins.json") == 0o600 and _mode(folder / "log") == 0o600
    assert (folder / "pins.json").read_text() == "{\"a\": 1}"
