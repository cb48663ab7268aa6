"""`flwr run .` end to end: our own SuperLink (simulation runtime) on a free local port.

flwr 1.41 reads SuperLink connections from ``$FLWR_HOME/config.toml`` (not pyproject.toml),
and a SuperLink started without ``--disable-runtime-dependency-installation`` runs
``uv sync`` on the app's dependencies before each run (network, a CUDA torch). So the
test starts ``flower-superlink --simulation --disable-runtime-dependency-installation``
itself, points a connection in a temporary FLWR_HOME at it, and runs the real CLI.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedtune.config import scenario_from_flat
from fedtune.deploy.server import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONNECTION = "fedtune-test"


def test_run_config_overrides_key_reaches_the_scenario():
    # `flwr run` only passes keys pyproject.toml declares: overrides ride in one string.
    scenario = scenario_from_flat({"scenario": "tiny", "out": "runs/flwr",
                                   "overrides": "run.rounds=1  train.steps=2 run.name='x'"})
    assert (scenario.run.rounds, scenario.train.steps, scenario.run.name) == (1, 2, "x")
    assert scenario_from_flat({"scenario": "tiny", "overrides": ""}).run.rounds == 3




def _die_with_parent() -> None:
    """Backstop for a killed pytest (no finalizer runs): Linux sends the SuperLink
    SIGTERM when its parent exits, and SuperExec and the runtime follow the SuperLink."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc`` and every process it spawned (SuperExec, the simulation runtime and
    its Ray workers start sessions of their own, so a process-group signal would miss
    them). psutil (a Ray dependency) tracks them without signalling a reused pid."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - flwr[simulation] installs it
        psutil = None
    children = []
    if psutil is not None:
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
    for sig in ("terminate", "kill"):
        if proc.poll() is None:
            getattr(proc, sig)()
        for child in children:
            with contextlib.suppress(psutil.Error):
                getattr(child, sig)()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        deadline = time.monotonic() + grace
        while True:
            children = [c for c in children if _running(c, psutil)]
            if not children or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if proc.poll() is not None and not children:
            return


def _running(process, psutil) -> bool:
    """Still running: a zombie (exited, parent gone, not yet reaped) counts as stopped."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def superlink(tmp_path):
    """A SuperLink in simulation mode on a free port, and the env that reaches it."""
    if not (BIN / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed next to this Python")
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # the SuperLink starts flower-superexec and flwr-simulation by name
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log_path = tmp_path / "superlink.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation",
             "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"flower-superlink exited ({proc.returncode}):\n"
                            + log_path.read_text()[-3000:])
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("flower-superlink not healthy in 30 s:\n"
                            + log_path.read_text()[-3000:])
            time.sleep(0.2)
        yield env, log_path
    finally:
        _terminate(proc)


@pytest.mark.timeout(240)
@pytest.mark.e2e
def test_flwr_run_tiny_one_round(superlink, tmp_path):
    env, log_path = superlink
    out = tmp_path / "runs"
    cmd = [
        str(BIN / "flwr"), "run", str(REPO), CONNECTION,
        "--run-config", f'scenario="tiny" out="{out}" overrides="run.rounds=1"',
        "--federation-config", "num-supernodes=4 client-resources-num-cpus=1",
        "--stream",
    ]
    try:
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=180)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"flwr run did not finish in 180 s:\n{err.stdout}\n{err.stderr}\n"
                    + log_path.read_text()[-3000:])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Successfully started run" in output, output
    # the run used the venv's packages: nothing was installed for it
    assert "Installing application dependencies" not in output + log_path.read_text(), output
    # no [tool.flwr.federations] to migrate: flwr run left pyproject.toml alone
    assert "Migration completed" not in output, output
    assert "CONFIGURATION MIGRATION NOTICE" not in (REPO / "pyproject.toml").read_text()

    run_dirs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
    assert len(run_dirs) == 1, f"{run_dirs}\n{output}"
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["status"] == "completed", output
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert summary["rounds"][0]["clients_replied"] == 4
    assert (run_dirs[0] / "adapter" / "adapter_model.safetensors").exists()
