"""examples/notes_assistant runs against a real local server on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedtune

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "examples" / "notes_assistant" / "notes_assistant.py"
QUICK = ["model.source='tiny'", "model.quantization='none'", "lora.rank=4", "lora.alpha=8",
         "data.seq_len=32", "data.max_eval_sequences=4", "train.steps=3", "train.batch_size=4",
         "data.num_clients=1", "run.rounds=1", "federation.min_clients=1"]

pytestmark = [pytest.mark.timeout(600), pytest.mark.e2e]


def _notes(path: Path, count: int) -> Path:
    path.write_text("\n\n".join(
        f"Note {i}: call the plumber, water the fig tree,\nand plan the beta release {i}."
        for i in range(count)))
    return path


def _app(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([sys.executable, str(APP), *args], capture_output=True, text=True,
                          env=env, timeout=400)


def test_notes_assistant_joins_a_federation_and_writes_in_style(tmp_path: Path) -> None:
    notes = _notes(tmp_path / "notes.txt", 30)
    with fedtune.Server(REPO / "server" / "server.toml", QUICK, insecure=True,
                        address="127.0.0.1:0", out=tmp_path / "runs") as server:
        done = _app(str(notes), "--server", server.address, "--insecure", "--state-dir",
                    str(tmp_path / "state"), "--ask", "Note 7:", "--tokens", "8")
        assert done.returncode == 0, done.stdout + done.stderr
        run_dir = server.wait(120)
    assert "round 1: trained on" in done.stdout
    assert (tmp_path / "state" / "adapter" / "adapter_config.json").is_file()
    assert f"adapter: {tmp_path / 'state' / 'adapter'}" in done.stdout
    lines = {line.split(":", 1)[0].strip(): line for line in done.stdout.splitlines()
             if line.startswith(("base model", "your style"))}
    assert set(lines) == {"base model", "your style"}
    assert (run_dir / "summary.json").is_file()


def test_notes_assistant_reports_bad_notes_without_connecting(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    done = _app(str(empty), "--server", "127.0.0.1:1", "--insecure",
                "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 1
    assert "notes assistant: data has 0 text(s)" in done.stderr
