"""Real `fedtune server` / `fedtune client` processes on localhost for the deployment tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import psutil

from fedtune.deploy.server import free_port  # noqa: F401  (h.free_port in the tests)

REPO = Path(__file__).resolve().parents[2]
FEDTUNE = [sys.executable, "-m", "fedtune.cli"]

#: the tiny config-built model on short sequences: a round takes seconds
TINY = ["model.source='tiny'", "model.quantization='none'", "data.seq_len=32",
        "data.max_samples_per_client=48", "data.max_eval_sequences=8", "train.steps=4",
        "train.batch_size=4", "lora.rank=4", "lora.alpha=8"]


def client_files(folder: Path, count: int) -> list[Path]:
    """One text file per client: the lines of a Shakespeare character each."""
    from fedtune.data import load_clients

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, c in enumerate(load_clients("shakespeare", num_clients=count, min_lines=64,
                                       seed=0, max_samples_per_client=64)):
        path = folder / f"client{i}.txt"
        path.write_text("\n".join(c.train + c.eval))
        files.append(path)
    return files


class Proc:
    """A child process in its own session (so a kill takes its Flower children too),
    its output in a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0",
               **(env or {})}
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT,
                                            cwd=REPO, env=env, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.log.name} still running after {timeout} s:\n"
                                 f"{self.output()[-3000:]}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM as a service manager would send, then make sure nothing is left."""
        self.kill(signal.SIGTERM)
        self.kill(signal.SIGKILL)


def server(tmp: Path, port: int, sets: list[str], extra: list[str] | None = None,
           name: str = "server") -> Proc:
    args = [*FEDTUNE, "server", "-c", str(REPO / "server" / "server.toml"),
            "--out", str(tmp / "runs"), "--set", f"server.address='127.0.0.1:{port}'"]
    for s in [*TINY, *sets]:
        args += ["--set", s]
    return Proc([*args, *(extra or [])], tmp / f"{name}.log")


def resume(tmp: Path, run_dir: Path, name: str = "resumed") -> Proc:
    return Proc([*FEDTUNE, "server", "--resume", str(run_dir)], tmp / f"{name}.log")


def client(tmp: Path, port: int, data: Path, extra: list[str] | None = None,
           name: str | None = None, env: dict[str, str] | None = None) -> Proc:
    args = [*FEDTUNE, "client", "--server", f"127.0.0.1:{port}", "--data", str(data),
            "--state-dir", str(tmp / f"state-{name or data.stem}"), *(extra or [])]
    return Proc(args, tmp / f"{name or data.stem}.log", env)


def run_dir_of(proc: Proc, timeout: float = 180) -> Path:
    """The run directory the server announces (a server that exits fails at once; under
    the suite's start-up load one took over 60 s to announce it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"run directory (\S+)", proc.output())
        if found:
            return Path(found.group(1).rstrip(";"))
        if proc.process.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.output()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"no run directory announced:\n{proc.output()[-3000:]}")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def wait_for_round(run_dir: Path, round_number: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(r["round"] >= round_number for r in summary(run_dir)["rounds"]):
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"round {round_number} did not complete within {timeout} s")


def wait_for_initial_evaluation(run_dir: Path, timeout: float) -> None:
    """Until the run's round-0 evaluation is in its summary (every client has joined)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if summary(run_dir).get("initial"):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no initial evaluation within {timeout} s")


def in_process_run(run_dir: Path, clients: list[tuple[str, Path]], out: Path,
                   wrap: dict | None = None) -> Path:
    """The deployed run's own scenario (its scenario.json) with the same clients, by name
    and data file, on the in-process Grid: the deployment's round loop and ClientApp
    without its processes, for a reference the deployed run must equal bit for bit.
    ``wrap`` maps a client's name to a function of the fedtune ClientApp giving that
    client's own (a test's malicious client). Node authentication is left
    out: it decides who may join, not what the members compute."""
    from dataclasses import replace

    from fedtune.deploy.server import load_run_scenario
    from fedtune.flower.client_app import make_client_app
    from fedtune.flower.inprocess_grid import InProcessGrid
    from fedtune.flower.server_app import run_federation
    from fedtune.runs.rundir import new_run_dir

    scenario = load_run_scenario(run_dir)
    scenario = replace(scenario, server=replace(scenario.server, auth_keys=""))
    default = make_client_app(scenario)
    apps = {name: make(default) for name, make in (wrap or {}).items()}

    def app(message, context):
        chosen = apps.get(str(context.node_config["name"]), default)
        return chosen(message=message, context=context)

    configs = [{"name": name, "data-path": str(data), "profile": ""} for name, data in clients]
    reference = new_run_dir(out, "in-process")
    with InProcessGrid(app, len(clients), node_configs=configs) as grid:
        run_federation(grid, scenario, reference, None)
    return reference


class PeakMemory:
    """Peak resident memory of a process and all its descendants (the SuperLink, its
    SuperExec and the ServerApp process), sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self.done = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.2):
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in tree:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self.done.set()
        self.thread.join(5)
        return self.peak


#: the settings of test_hostile_client's federations, shared by the honest one below
HOSTILE_SETS = ["data.num_clients=3", "federation.min_clients=2", "run.rounds=4",
                "federation.round_timeout=90", "federation.max_update_norm=1000"]


class HonestRun(NamedTuple):
    run_dir: Path
    server_peak_memory: int  # bytes, the server's process tree
    restarted: Proc  # the client that died after round 1, back under its name


def honest_federation(tmp: Path) -> HonestRun:
    """Three honest clients, four rounds; the third client's machine dies after round 1
    and the client comes back under its name while round 2 waits for it (40 s). One
    federation serves two modules: test_deployment (a client that dies does not stop
    the run, and rejoins) and test_hostile_client (the server's peak memory without an
    attacker, the reference for the attacked run's)."""
    port = free_port()
    files = client_files(tmp / "data", 3)
    proc = server(tmp, port, [*HOSTILE_SETS, "federation.round_timeout=40"], ["--insecure"])
    memory = PeakMemory(proc.process.pid)
    clients: list[Proc] = []
    try:
        run_dir = run_dir_of(proc)
        clients = [client(tmp, port, f, ["--insecure"]) for f in files]
        wait_for_round(run_dir, 1, 240)
        clients[2].kill()  # the client's machine dies: its SuperNode and worker
        clients.append(client(tmp, port, files[2], ["--insecure"], name="restarted"))
        code = proc.wait(400)
    finally:
        peak = memory.stop()
        for c in [*clients, proc]:
            c.stop()
    assert code == 0, proc.output()[-3000:]
    return HonestRun(run_dir, peak, clients[-1])
