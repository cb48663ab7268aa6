"""The clients' port degrades, never dies (real processes on localhost, tiny model,
TLS and node authentication).

While a three-client federation runs, an outsider holding only the CA certificate (from
another loopback address, see ``outsider``) opens 2,000 idle TLS connections, then 300
slow uploads, then 64 stalled 64 MiB uploads: the server stays up, every round
completes with the adapter of the same federation without an attacker (the in-process
Grid, bit for bit), an honest health probe is answered within PROBE_BOUND throughout,
and the server's process tree peaks within 1.5x of an unattacked federation's (the
session's ``honest_federation``, as test_hostile_client). In a second federation an
admitted client adds 1.5 GB of arrays to its first reply: the front refuses it past the
node's message budget with a logged reason, the server's memory stays within 1.5x, and
the run completes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.deploy import harness as h
from tests.deploy import outsider

pytestmark = [pytest.mark.timeout(600), pytest.mark.e2e]

SETS = ["data.num_clients=3", "run.rounds=3", "federation.round_timeout=90"]
#: the bloated client's first reply never arrives: its round ends at this deadline
BLOATED_SETS = ["data.num_clients=3", "federation.min_clients=2", "run.rounds=2",
                "federation.round_timeout=45"]
#: the slowest answer the honest probe may get under any attack (seconds; measured
#: under 1 s on 2 shared cores, see benchmarks/RESULTS.md)
PROBE_BOUND = 5.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from fedtune.deploy.certs import make_certificates

    folder = tmp_path_factory.mktemp("certs")
    made = make_certificates(folder, nodes=3)
    allowed = folder / "allowed.pub"
    allowed.write_text("".join(p.read_text() for p in made.node_public_keys))
    return made, allowed


def _server(tmp: Path, port: int, keys, sets: list[str]) -> h.Proc:
    made, allowed = keys
    return h.server(tmp, port, [*sets, f"server.ca_cert='{made.ca_cert}'",
                                f"server.cert='{made.cert}'", f"server.key='{made.key}'",
                                f"server.auth_keys='{allowed}'"])


def _clients(tmp: Path, port: int, keys, files: list[Path],
             apps: dict[int, str] | None = None) -> list[h.Proc]:
    made, _ = keys
    return [h.client(tmp, port, f, ["--root-certificates", str(made.ca_cert),
                                    "--auth-key", str(k),
                                    *(["--app", apps[i]] if apps and i in apps else [])])
            for i, (f, k) in enumerate(zip(files, made.node_keys, strict=True))]


def _attack(port: int, ca_cert: str) -> dict:
    """The three attacks in turn (each in a process of its own), the probe running
    throughout; per phase what the attacker saw and the probe's latencies."""
    probe = outsider.Probe(port, ca_cert)
    phases: dict = {}
    try:
        time.sleep(3.0)
        phases["none"] = {"probe": probe.between(0, time.monotonic())}
        for name in ("idle", "slow", "stalled"):
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "tests.deploy.outsider", name, str(port), ca_cert],
                cwd=h.REPO, capture_output=True, text=True, timeout=120,
                env={**os.environ, "PYTHONPATH": str(h.REPO)})
            assert done.returncode == 0, done.stderr[-2000:]
            phases[name] = {"outcome": json.loads(done.stdout),
                            "probe": probe.between(started, time.monotonic())}
    finally:
        probe.stop()
    return phases


def _flooded(tmp: Path, keys) -> dict:
    made, _ = keys
    port = h.free_port()
    files = h.client_files(tmp / "data", 3)
    server = _server(tmp, port, keys, SETS)
    memory = h.PeakMemory(server.process.pid)
    clients: list[h.Proc] = []
    try:
        run_dir = h.run_dir_of(server)
        clients = _clients(tmp, port, keys, files)
        h.wait_for_initial_evaluation(run_dir, 300)
        phases = _attack(port, str(made.ca_cert))
        alive_after_attack = server.process.poll() is None
        code = server.wait(400)
    finally:
        peak = memory.stop()
        for c in [*clients, server]:
            c.stop()
    return dict(tmp=tmp, run_dir=run_dir, server=server, code=code, peak=peak,
                phases=phases, alive=alive_after_attack, files=files)


#: the bloated client holds its extra record about three times (its arrays, their Flower
#: objects, its SuperNode's store) before the front refuses it
BLOATED_NEEDS = 6 << 30


def _bloated(tmp: Path, keys) -> dict | None:
    import psutil

    if psutil.virtual_memory().available < BLOATED_NEEDS:
        return None
    port = h.free_port()
    files = h.client_files(tmp / "data", 3)
    server = _server(tmp, port, keys, BLOATED_SETS)
    memory = h.PeakMemory(server.process.pid)
    clients: list[h.Proc] = []
    try:
        run_dir = h.run_dir_of(server)
        clients = _clients(tmp, port, keys, files, {2: "tests.deploy.bloat_app:gigabytes"})
        code = server.wait(400)
    finally:
        peak = memory.stop()
        for c in [*clients, server]:
            c.stop()
    return dict(run_dir=run_dir, server=server, code=code, peak=peak, clients=clients)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, keys, honest_federation):
    """Both federations at once (each mostly waits on Flower's polling)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        flooded = pool.submit(_flooded, tmp_path_factory.mktemp("flooded"), keys)
        bloated = pool.submit(_bloated, tmp_path_factory.mktemp("bloated"), keys)
        return flooded.result(), bloated.result()


def _worst(samples: list[tuple[float, int]]) -> float:
    return max(seconds for seconds, _ in samples)


def test_the_flooded_server_stays_up_and_answers_the_probe_in_time(runs):
    flooded, _ = runs
    assert flooded["alive"]
    assert flooded["code"] == 0, flooded["server"].output()[-3000:]
    for name, phase in flooded["phases"].items():
        samples = phase["probe"]
        assert samples, name
        assert all(status == 200 for _, status in samples), (name, samples)
        assert _worst(samples) < PROBE_BOUND, (name, samples)
    print("probe latency, worst per phase (s):",
          {n: round(_worst(p["probe"]), 3) for n, p in flooded["phases"].items()},
          "attacks:", {n: {k: v for k, v in p["outcome"].items() if k != "answers"}
                       for n, p in flooded["phases"].items() if "outcome" in p})


def test_the_outsider_got_its_connections_and_only_refusals(runs):
    flooded, _ = runs
    phases = flooded["phases"]
    idle = phases["idle"]["outcome"]
    # every connection was tried: opened (then dropped at the header deadline) or reset at
    # the accept; how many got a handshake depends on the machine's load (0-45 seen)
    assert idle["opened"] + sum(idle["not_opened"].values()) == 2000, idle
    slow, stalled = phases["slow"]["outcome"], phases["stalled"]["outcome"]
    # refused as unauthenticated, or as one connection too many: never served (a stalled
    # upload's answer is often lost: the front closes while it still writes, and the
    # reset drops what was received)
    for outcome in (slow, stalled):
        assert all(a.split()[1] in ("401", "503") for a in outcome["answers"]), outcome
    assert any(a.split()[1] == "401" for a in slow["answers"]), slow
    assert stalled["opened"] > 0, stalled
    assert stalled["sent_max"] < 32 << 20, stalled  # the front stopped reading long before
    assert "refused (401)" in flooded["server"].output()


def test_every_round_completes_with_the_unattacked_adapter(runs):
    flooded, _ = runs
    run_dir = flooded["run_dir"]
    summary = h.summary(run_dir)
    assert summary["status"] == "completed"
    assert [r["clients_replied"] for r in summary["rounds"]] == [3, 3, 3]
    reference = h.in_process_run(run_dir, [(f.stem, f) for f in flooded["files"]],
                                 flooded["tmp"] / "reference")
    attacked = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    unattacked = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert attacked.keys() == unattacked.keys()
    assert all(torch.equal(attacked[k], unattacked[k]) for k in attacked)


def test_the_flooded_server_spends_no_more_memory_than_an_unattacked_one(runs,
                                                                       honest_federation):
    flooded, _ = runs
    honest = honest_federation.result().server_peak_memory
    print(f"server peak: flooded {flooded['peak'] / 2**20:.0f} MiB, unattacked "
          f"{honest / 2**20:.0f} MiB")
    assert flooded["peak"] < 1.5 * honest, (flooded["peak"] / 2**20, honest / 2**20)


def test_an_admitted_clients_extra_gigabytes_are_refused_at_its_budget(runs, honest_federation):
    _, bloated = runs
    if bloated is None:
        pytest.skip(f"the bloated client needs {BLOATED_NEEDS >> 30} GiB of free memory "
                    "on this machine")
    assert bloated["code"] == 0, bloated["server"].output()[-3000:]
    log = bloated["server"].output()
    summary = h.summary(bloated["run_dir"])
    assert summary["status"] == "completed"
    # refused by whichever sees it first: the front, by the bytes the node pushes past its
    # budget, or the ServerApp, by the reply's object tree (listed before its objects
    # arrive: the SuperLink then drops the message and the node's pushes end)
    at_front = "over its budget of" in log and "LoRA parameters at rank" in log
    by_serverapp = any("refused: reply of" in reason or "records it may not" in reason
                       for reason in summary["rounds"][0].get("dropped", []))
    assert at_front or by_serverapp, (summary["rounds"][0], log[-3000:])
    replied = [r["clients_replied"] for r in summary["rounds"]]
    assert replied[0] == 2 and replied[1] >= 2, replied  # round 1: the bloated reply never came
    honest = honest_federation.result().server_peak_memory
    print(f"server peak: bloated client {bloated['peak'] / 2**20:.0f} MiB, unattacked "
          f"{honest / 2**20:.0f} MiB")
    assert bloated["peak"] < 1.5 * honest, (bloated["peak"] / 2**20, honest / 2**20)
