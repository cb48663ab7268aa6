"""fedtune as a user gets it: a wheel built from this repository, installed outside the
checkout, used from a folder that is not the checkout.

Offline and quick: the wheel is built without build isolation (the installed
setuptools), installed with ``--no-deps`` into a target folder, and run by this
interpreter with only that folder on ``PYTHONPATH``, so torch, Flower and the asset
packages are the ones already installed while every line of fedtune and every bundled
file comes from the wheel (the test checks which fedtune was imported).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: what the build reads: the package, its metadata, and the folders fedtune/bundled links to
SOURCES = ("pyproject.toml", "README.md", "fedtune", "simulations", "clients", "server")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _copy_sources(into: Path) -> Path:
    """The build's inputs in a fresh folder (links kept as links), so no stale build/
    folder of the checkout can leak into the wheel and nothing is written to the checkout."""
    into.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, into / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(source, into / name)
    return into


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the sources, installed into a target folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = _copy_sources(root / "source")
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input",
           "--no-cache-dir"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = wheels.glob("fedtune-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    for name in ("simulations/tiny.toml", "simulations/hetero.toml", "profiles/cpu-box-16gb.toml",
                 "server/server.toml"):
        assert f"fedtune/bundled/{name}" in shipped, f"the wheel lacks {name}"
    target = root / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target",
                              str(target), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    assert not (target / "fedtune" / "bundled" / "simulations").is_symlink()
    return target


def _run(installed: Path, cwd: Path, *args: str, timeout: float = 300
         ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(installed), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _fedtune(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = _run(installed, cwd, "-m", "fedtune.cli", *args)
    assert done.returncode == 0, f"fedtune {' '.join(args)}:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working folder outside the checkout."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    assert REPO not in folder.resolve().parents
    return folder


def test_the_installed_fedtune_is_the_wheels(installed: Path, elsewhere: Path) -> None:
    done = _run(installed, elsewhere, "-c", "import fedtune, fedtune.resources as r; "
                "print(fedtune.__file__); print(r.folder('scenario'))")
    assert done.returncode == 0, done.stderr[-2000:]
    module, scenarios = done.stdout.split()
    assert Path(module).is_relative_to(installed) and Path(scenarios).is_relative_to(installed)


def test_simulate_plan_list_and_client_run_from_the_wheel(installed: Path,
                                                          elsewhere: Path) -> None:
    """The must-show: every bundled thing works from a folder outside the checkout, and
    the plan's bytes are what the simulation recorded."""
    done = _fedtune(installed, elsewhere, "simulate", "-s", "tiny", "--set", "run.rounds=2",
                    "--set", "train.steps=2", "--out", "runs")
    run_dir = elsewhere / done.stdout.strip().splitlines()[-1]  # relative to --out
    assert run_dir.is_relative_to(elsewhere / "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["rounds"]) == 2

    plan = json.loads(_fedtune(installed, elsewhere, "plan", "-s", "tiny", "--json").stdout)
    second = summary["rounds"][1]
    assert (plan["round_bytes_down"], plan["round_bytes_up"]) == (second["bytes_down"],
                                                                 second["bytes_up"])
    assert summary["rounds"][0]["bytes_down"] == plan["round_1_bytes_down"] == 0

    hetero = _fedtune(installed, elsewhere, "plan", "-s", "hetero").stdout
    for profile in ("cpu-box-16gb", "laptop-rtx4060-8gb", "jetson-orin-nano-8gb",
                    "workstation-rtx4090-24gb"):
        assert profile in hetero
    listed = _fedtune(installed, elsewhere, "list").stdout
    for name in ("tiny", "hetero", "default", "cpu-box-16gb", "fedavg", "zeropad"):
        assert f"  {name} " in listed
    client_help = _fedtune(installed, elsewhere, "client", "--profile", "cpu-box-16gb",
                           "--help").stdout
    assert "--server" in client_help
    assert _fedtune(installed, elsewhere, "--version").stdout.startswith("fedtune ")


SDK = """
import fedtune
texts = ["To be, or not to be, that is the question: whether 'tis nobler in the mind",
         "to suffer the slings and arrows of outrageous fortune, or to take arms against",
         "a sea of troubles, and by opposing end them. To die, to sleep; no more; and by",
         "a sleep to say we end the heart-ache and the thousand natural shocks that flesh"] * 8
result = fedtune.Client(texts, model="tiny", state_dir="state").train_local(steps=2)
print("adapter", result.adapter)
server = fedtune.Server("server/server.toml", ["model.source='tiny'"], insecure=True)
print("federation base", server.scenario.model.source, server.scenario.run.name)
"""


def test_the_sdk_trains_locally_from_the_wheel(installed: Path, elsewhere: Path) -> None:
    """``Client(texts).train_local()`` and docs/sdk.md's ``Server("server/server.toml")``
    (built, not started) with no checkout around."""
    done = _run(installed, elsewhere, "-c", SDK)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = elsewhere / done.stdout.split("adapter ", 1)[1].split()[0]
    assert (adapter / "adapter_config.json").is_file()
    assert "federation base tiny deployment" in done.stdout
