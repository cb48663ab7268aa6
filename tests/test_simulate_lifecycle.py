"""`fedtune simulate` as a process: Ctrl-C in round 2 (SIGINT to its process group, as a
terminal sends it) stops it and every process it started within seconds, the run
directory says "interrupted" with round 1 kept, and `--resume` ends with exactly the
adapter of an uninterrupted run; bad arguments fail in one line before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import load_scenario
from fedtune.flower.inprocess_grid import simulate_in_process

REPO = Path(__file__).resolve().parents[1]
# round 2 must outlast the signal's way in; one held-out reply names its phase
SETS = ["run.rounds=3", "train.steps=40", "report.generations=1", "report.max_new_tokens=4"]
STOP_WITHIN = 10.0


def _fedtune(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """The real command in a session of its own (its process group is its own)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _in_session(sid: int) -> list[psutil.Process]:
    """Every process left in the session (Ray's processes stay in their driver's)."""
    left = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                left.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return left


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.e2e
def test_sigint_in_round_2_stops_everything_and_resume_ends_bit_identical(tmp_path):
    out = tmp_path / "runs"
    sets = [arg for s in SETS for arg in ("--set", s)]
    proc = _fedtune("simulate", "-s", "tiny", *sets, "--out", str(out), cwd=tmp_path)
    lines, tree, names, sent = [], [], [], None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        # round 1 is recorded and checkpointed, round 2 starts: it takes seconds
        if sent is None and line.startswith("round 1/3  train loss"):
            tree = psutil.Process(proc.pid).children(recursive=True)
            names = [p.name() for p in tree]
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C
            sent = time.monotonic()
    proc.wait(timeout=60)
    output = "".join(lines)
    assert sent is not None, output[-3000:]
    took = time.monotonic() - sent
    assert took < STOP_WITHIN, f"exited {took:.1f} s after SIGINT:\n{output[-3000:]}"
    assert proc.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "raylet" in names and any("ClientAppActor" in n for n in names), names
    gone_by = time.monotonic() + 2.0  # a process that Ray's shutdown has just killed
    while (_in_session(proc.pid) or any(p.is_running() for p in tree)) and (
            time.monotonic() < gone_by):
        time.sleep(0.1)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not _in_session(proc.pid)
    (run_dir,) = out.iterdir()
    # the run directory is said before the first round, nothing third-party in the log
    assert output.index(f"run directory {run_dir}") < output.index("round 0/3")
    assert "FutureWarning" not in output and "\r" not in output
    assert "Traceback" not in output and "ERROR" not in output, output[-3000:]
    assert f"continue with: fedtune simulate --resume {run_dir}" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["error"] == "interrupted by SIGINT"
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert "interrupted" in (run_dir / "report.html").read_text()

    resumed = _fedtune("simulate", "--resume", str(run_dir), cwd=tmp_path)
    resumed_output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, resumed_output[-3000:]
    assert "generating 1 held-out replies" in resumed_output
    # it went on after round 1 (a rerun from scratch would end with the same adapter)
    assert "round 2/3  train loss" in resumed_output and "round 3/3  train loss" in resumed_output
    assert "round 0/3" not in resumed_output and "round 1/3" not in resumed_output
    assert "round 4/3" not in resumed_output and "\r" not in resumed_output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and "error" not in summary
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]

    # the same seeded run, uninterrupted (same ClientApp and seeds, no engine start)
    whole = simulate_in_process(load_scenario("tiny", SETS), out_dir=tmp_path / "whole")
    expected, got = _adapter(whole), _adapter(run_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_errors_before_work_are_one_line_and_leave_nothing(tmp_path):
    """Each bad start, on the command (tests.support.cli: an exception fails the test):
    one line that names the problem, no run directory made, no engine started."""
    from tests.support.cli import run_cli

    out = tmp_path / "runs"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "scenario.json").write_text("{}")
    cases = [
        (["-s", "tiny", "--out", str(a_file)], f"output folder {a_file} is a file"),
        (["-s", "tiny", "--out", str(a_file / "runs")], f"is inside {a_file}, a file"),
        (["-s", str(run_dir), "--out", str(out)],
         f"-s {run_dir} is a run directory, not a scenario file; continue it with: "
         f"fedtune simulate --resume {run_dir}"),
        (["--resume", str(tmp_path / "nope")], "no such run directory"),
    ]
    if not torch.cuda.is_available():
        cases.append((["-s", "tiny", "--set", "model.device='cuda'", "--out", str(out)],
                      "model.device = 'cuda': device 'cuda' was requested but CUDA is not "
                      "available"))
    for args, fragment in cases:
        result = run_cli("simulate", *args, cwd=tmp_path)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line]
        assert result.exit_code in (1, 2) and len(lines) == 1, (args, lines)
        assert fragment in lines[0], lines
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "old-run"]


def test_clients_get_a_gpu_share_sized_from_the_memory_estimate():
    """With model.device = "auto" and a GPU, each client asks Ray for the share of it
    that the memory estimate allows (the GPUs are faked at training_device's boundary:
    no CUDA here); the run records it. Without a GPU, or with device "cpu", none."""
    from fedtune.planning.gpu_share import GPU_USABLE, client_memory_mb, gpu_share
    from fedtune.planning.gpu_share import simulation_device as training_device
    from fedtune.runs.cluster import NodeSize
    from fedtune.runs.simulate import backend_config

    assert gpu_share(10_000, 80_000, clients=100) == 0.1666  # 6 fit in 68,000 MiB
    assert gpu_share(10_000, 80_000, clients=4) == 0.25  # never more than the clients
    assert gpu_share(90_000, 80_000, clients=4) == 1.0  # none fits: a whole GPU each
    assert gpu_share(1, 80_000, clients=20_000) == 0.0001  # Ray's resolution
    for client_mb, gpu_mb, clients in [(3_000, 24_000, 50), (700, 16_000, 8), (1, 1, 1)]:
        per_gpu = round(1 / gpu_share(client_mb, gpu_mb, clients))
        assert per_gpu * client_mb <= gpu_mb * GPU_USABLE or per_gpu == 1
        assert per_gpu <= clients

    scenario = load_scenario("tiny", ["model.device='auto'", "data.num_clients=4"])
    client_mb = client_memory_mb(scenario)
    assert client_mb > 0
    gpu_mb = 16 * client_mb / GPU_USABLE  # room for 16; 4 clients: a quarter each
    share, device = training_device(scenario, gpus=[gpu_mb, 2 * gpu_mb])
    assert share == 0.25 and device["trains_on"] == "cuda"
    assert device["gpus_per_client"] == 0.25 and "2 GPU(s)" in device["why"]
    small = load_scenario("tiny", ["model.device='auto'", "data.num_clients=40"])
    assert training_device(small, gpus=[gpu_mb])[0] == 0.0625  # 16 share it
    assert training_device(scenario, gpus=[]) == (0.0, {
        "trains_on": "cpu", "gpus_per_client": 0.0,
        "why": "model.device = 'auto' and no CUDA GPU here"})
    cpu = load_scenario("tiny", ["model.device='cpu'"])
    assert training_device(cpu, gpus=[gpu_mb])[0] == 0.0
    fixed = load_scenario("tiny", ["model.device='auto'", "simulation.gpus_per_client=0.5"])
    assert training_device(fixed, gpus=[gpu_mb])[0] == 0.5
    node = NodeSize("n" * 8, "10.0.0.1", cpus=4, gpus=1, memory_gb=64)
    config = backend_config(scenario, nodes=[node], address="10.0.0.1:6379",
                            gpus_per_client=share)
    assert config["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_the_engine_handles_is_only_noted_and_elsewhere_raises(signum):
    """While Flower's engine runs, simulate's handler only asks the round loop to stop
    (True: handled); before and after, the signal raises where the main thread is."""
    from fedtune.runs.lifecycle import Interrupted, stop_signals

    heard = []
    with stop_signals(lambda s: heard.append(s) or True) as received:
        os.kill(os.getpid(), signum)
        time.sleep(0.2)
        os.kill(os.getpid(), signum)  # a second one: noted once, nothing else
        time.sleep(0.2)
    assert heard == [signum] and received == [signum]
    with pytest.raises(Interrupted) as stopped, stop_signals(lambda s: False):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises here
    assert stopped.value.signum == signum
