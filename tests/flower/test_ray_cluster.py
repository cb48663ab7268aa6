"""The simulator on an existing Ray cluster: a head and a worker node, each its own
``ray start`` with its own temp dir and 1 CPU, on this machine (``ray_harness``).

The cluster serves the whole module; the test that kills the worker node runs last and
the fixture starts a fresh worker for any test after it. The harness stops only the
process groups it started (never ``ray stop``)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from ray_harness import LocalRayCluster, free_port
from safetensors.torch import load_file

from fedtune.config import ConfigError, load_scenario
from fedtune.flower.inprocess_grid import simulate_in_process
from fedtune.flower.ray_nodes import describe
from fedtune.runs.cluster import ClusterError, NodeSize, check_fits, joined, resolve_address
from fedtune.runs.simulate import simulate

ACTOR_RUNNING = "ray::ClientAppActor.run"  # a worker's process title while it runs a client


def _scenario(address: str, *overrides: str):
    return load_scenario("tiny", [f"simulation.ray_address='{address}'", "run.rounds=2",
                                  *overrides])


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == "train"]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


# ---- where the engine runs: no cluster needed ------------------------------------------
@pytest.mark.parametrize(("setting", "env", "expected"), [
    ("", None, None),                               # a private instance, as before
    ("", "10.0.0.1:6379", "10.0.0.1:6379"),         # RAY_ADDRESS stands in for "unset"
    ("auto", None, "auto"),
    ("auto", "10.0.0.1:6379", "10.0.0.1:6379"),     # ... and for "auto"
    ("10.0.0.2:6379", "10.0.0.1:6379", "10.0.0.2:6379"),  # a concrete address wins
    ("local", "10.0.0.1:6379", None),               # private, whatever RAY_ADDRESS says
    ("", "local", None),
])
def test_the_address_is_read_as_ray_reads_it(setting, env, expected):
    environ = {} if env is None else {"RAY_ADDRESS": env}
    assert resolve_address(setting, environ) == expected


@pytest.mark.parametrize("bad", ["10.0.0.1", "host:port", "10.0.0.1:0", "a b:1", "http://x:1"])
def test_a_malformed_address_is_a_configuration_error(bad):
    with pytest.raises(ConfigError, match="simulation.*ray_address"):
        _scenario(bad)


def _node(cpus: float, gpus: float, head: bool = False) -> NodeSize:
    return NodeSize(f"{int(cpus)}{int(gpus)}" + "0" * 54, "10.0.0.1", cpus, gpus, 16.0, head)


@pytest.mark.parametrize(("cpus", "gpus", "at_once"), [
    (1, 0, 4 + 8),        # CPUs only: each node's CPUs / cpus_per_client
    (2, 0, 2 + 4),
    (1, 0.25, 0 + 8),     # a quarter GPU: four per GPU, capped by the node's CPUs
    (0.5, 0.25, 0 + 8),   # ... and by its GPUs
    (1, 1, 0 + 2),
])
def test_clients_at_once_are_counted_per_node(cpus, gpus, at_once):
    spec = _scenario("auto", f"simulation.cpus_per_client={cpus}",
                     f"simulation.gpus_per_client={gpus}").simulation
    nodes = [_node(4, 0, head=True), _node(8, 2)]
    assert check_fits(spec, nodes, "auto") == at_once


def test_a_gpu_request_larger_than_every_node_names_them():
    spec = _scenario("auto", "simulation.gpus_per_client=3").simulation
    with pytest.raises(ClusterError) as refused:
        check_fits(spec, [_node(4, 0, head=True), _node(8, 2)], "10.0.0.1:6379")
    assert "4 CPU, 0 GPU" in str(refused.value) and "8 CPU, 2 GPU" in str(refused.value)
    with pytest.raises(ClusterError, match="no live node"):
        check_fits(spec, [], "10.0.0.1:6379")


def test_a_record_names_its_node_in_text():
    node_id = "7d039ee34192392dd89575bda55fd728aad0393db2683ab9e7ef934d"
    record = {"round": 1, "ray_node": int(node_id[:12], 16), "ray_node_ip": 3221225986}
    assert describe(record) == {"round": 1, "ray_node_id": node_id[:12], "node_ip": "192.0.2.2"}
    assert describe({"round": 1}) == {"round": 1}  # a deployed client: nothing to add


def test_nothing_listening_at_the_address_fails_in_seconds(tmp_path):
    start = time.monotonic()
    with pytest.raises(ClusterError, match="no Ray cluster answers"):
        simulate(_scenario(f"127.0.0.1:{free_port()}"), out_dir=tmp_path)
    assert time.monotonic() - start < 30  # ray.init alone retries a dead address for minutes
    assert not any(tmp_path.iterdir())


# ---- a real two-node cluster ---------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    local = LocalRayCluster()
    try:
        local.start_head(cpus=1)
        local.add_worker(cpus=1)
        yield local
    finally:
        local.stop()


@pytest.fixture
def two_nodes(cluster: LocalRayCluster) -> LocalRayCluster:
    """The cluster with a live worker (a new one after a test killed the last)."""
    if not cluster.nodes[-1].processes():
        cluster.add_worker(cpus=1)
    return cluster


@pytest.mark.slow
@pytest.mark.e2e
def test_a_client_no_node_can_host_is_refused_before_the_engine_starts(
        two_nodes, tmp_path, monkeypatch):
    import flwr.simulation
    import ray

    def engine(*args, **kwargs):
        raise AssertionError("the simulation engine started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", engine)
    # two CPUs per client: the cluster has two, but no node has two
    for override in ("simulation.cpus_per_client=2", "simulation.gpus_per_client=0.5"):
        with pytest.raises(ClusterError) as refused:
            simulate(_scenario(two_nodes.address, override), out_dir=tmp_path)
        message = str(refused.value)
        assert "no node of the Ray cluster" in message
        assert message.count("1 CPU, 0 GPU") == 2, message  # both nodes' sizes, named
        assert not ray.is_initialized()  # the driver left the cluster again
    assert not any(tmp_path.iterdir())  # no run directory


@pytest.mark.slow
@pytest.mark.e2e
def test_clients_run_on_both_nodes_and_the_adapter_equals_one_machines(two_nodes, tmp_path):
    with joined(two_nodes.address) as nodes:
        ids = {n.node_id for n in nodes}
    assert len(ids) == 2 and sum(n.cpus for n in nodes) == 2

    run_dir = simulate(_scenario(two_nodes.address), out_dir=tmp_path / "cluster")
    records = _train_records(run_dir)
    assert len(records) == 2 * 4
    assert {r["ray_node_id"] for r in records} == ids  # each record names its node
    assert all(r["node_ip"].count(".") == 3 for r in records)

    # The same seed on one machine: each client's training is deterministic and the
    # strategy sorts replies by client, so the result is exact. One machine is the
    # in-process Grid, which test_simulation.py holds bit-identical to a private engine.
    local_dir = simulate_in_process(_scenario("local"), out_dir=tmp_path / "local")
    assert not any("ray_node_id" in r and r["ray_node_id"] in ids
                   for r in _train_records(local_dir))
    on_cluster, on_one = _adapter(run_dir), _adapter(local_dir)
    assert on_cluster.keys() == on_one.keys()
    assert all(torch.equal(on_cluster[k], on_one[k]) for k in on_one)
    losses = [[r["eval_loss"] for r in json.loads((d / "summary.json").read_text())["rounds"]]
              for d in (run_dir, local_dir)]
    assert losses[0] == losses[1]


@pytest.mark.slow
@pytest.mark.e2e
def test_compare_joins_the_cluster_named_by_ray_address_in_the_environment(
        two_nodes, tmp_path, monkeypatch):
    """``fedtune compare`` as typed, in this process (tests/support/cli.py): only the
    environment names the cluster."""
    from tests.support.cli import run_cli

    with joined(two_nodes.address) as nodes:
        ids = {n.node_id for n in nodes}
    monkeypatch.setenv("RAY_ADDRESS", two_nodes.address)
    done = run_cli("compare", "-s", "tiny", "-a", "fedavg", "--no-baselines",
                   "--set", "run.rounds=1", "--out", str(tmp_path))
    assert done.exit_code == 0, done.stdout + done.stderr
    (run_dir,) = (p.parent for p in tmp_path.rglob("metrics.jsonl"))
    records = _train_records(run_dir)
    assert len(records) == 4 and {r["ray_node_id"] for r in records} <= ids


@pytest.mark.slow
@pytest.mark.e2e
def test_a_node_lost_in_round_two_costs_its_client_and_the_run_finishes(two_nodes, tmp_path):
    head, victim = two_nodes.nodes[0], two_nodes.nodes[-1]
    killed: dict[str, float] = {}

    def kill_when_busy() -> None:
        """Kill the worker node's whole process group while it trains a client."""
        deadline = time.monotonic() + 120
        while not victim.running(ACTOR_RUNNING) and time.monotonic() < deadline:
            time.sleep(0.01)
        if victim.running(ACTOR_RUNNING):
            victim.kill()
            killed["at"] = time.monotonic()

    def progress(record: dict) -> None:
        if record["round"] == 1:  # round 1 is over; the next task on the worker is round 2's
            threading.Thread(target=kill_when_busy, daemon=True).start()

    with joined(two_nodes.address) as nodes:
        head_id = next(n.node_id for n in nodes if n.head)
    run_dir = simulate(_scenario(two_nodes.address, "run.rounds=3", "train.steps=24"),
                       out_dir=tmp_path, progress=progress)
    assert "at" in killed, "the worker node never ran a round-2 client"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    first, second, third = summary["rounds"]
    assert first["clients_replied"] == 4 and first["dropped"] == []
    # round 2: the client on the dead node is dropped and counted, the rest aggregate
    assert second["clients_sampled"] == 4 and second["clients_replied"] == 3
    assert len(second["dropped"]) == 1
    # after it, every client runs on the surviving node: the dead worker is out of the
    # pool (Flower's own backend keeps handing it messages, which all fail)
    assert third["clients_replied"] == 4 and third["dropped"] == []
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    evaluated = [r["round"] for r in map(json.loads, lines) if r["phase"] == "eval"]
    assert [evaluated.count(n) for n in (0, 1, 2, 3)] == [4, 4, 4, 4]
    records = _train_records(run_dir)
    assert {r["ray_node_id"] for r in records if r["round"] == 3} == {head_id}
    assert "was lost" in second["dropped"][0] and "WorkerLostError" in second["dropped"][0]
    assert not victim.processes()
    assert head.processes()
