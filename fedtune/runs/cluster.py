"""The simulation engine on an existing Ray cluster: which one, and what it can host.

``simulation.ray_address`` chooses where Flower's simulation engine runs, the way
``ray.init(address=...)`` reads an address:

* ``""`` (the default): ``RAY_ADDRESS`` when it is set, else a private Ray instance on
  this machine, sized by its CPUs (as before this setting existed). Unlike a bare
  ``ray.init()``, an unset address never joins a cluster that ``ray start`` left running
  on this machine: say ``"auto"`` for that.
* ``"auto"``: ``RAY_ADDRESS`` when set, else the cluster this machine is a node of
  (``ray start`` records it); an error when there is none.
* ``"HOST:PORT"``: that cluster's head (its GCS port, ``ray start --head --port``); it
  wins over ``RAY_ADDRESS``. ``"ray://HOST:PORT"`` goes through Ray Client (not tested).
* ``"local"``: a private instance, whatever ``RAY_ADDRESS`` says.

On a cluster the driver (this process: the ServerApp, the run directory) joins before
the engine starts, reads the live nodes' sizes and refuses a client that no node can
host (``cpus_per_client`` / ``gpus_per_client`` larger than every node's), naming the
sizes. Flower's backend then finds Ray initialised and uses the cluster as it is: one
actor per client-sized share of each node. Where things live on a cluster:
docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from fedtune.config import SimulationSpec
from fedtune.runs import SimulationError

log = logging.getLogger("fedtune")

ENV = "RAY_ADDRESS"
#: seconds to wait for the head's GCS port to accept a connection (ray.init itself
#: retries a dead address for minutes)
PROBE_TIMEOUT = 5.0


class ClusterError(SimulationError):
    """The Ray cluster cannot be reached, or no node of it can host a client."""


def resolve_address(setting: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The cluster address the engine joins, or None for a private instance here."""
    env = (os.environ if environ is None else environ).get(ENV, "").strip()
    if setting == "local":
        return None
    if setting in ("", "auto") and env:
        return None if env == "local" else env
    return setting or None


@dataclass(frozen=True)
class NodeSize:
    """What one live node of the cluster offers the engine."""

    node_id: str
    ip: str
    cpus: float
    gpus: float
    memory_gb: float
    head: bool = False

    def clients(self, spec: SimulationSpec) -> int:
        """Clients this node runs at once (Flower's per-node actor count)."""
        count = math.floor(self.cpus / spec.cpus_per_client + 1e-9)
        if spec.gpus_per_client > 0:
            count = min(count, math.floor(self.gpus / spec.gpus_per_client + 1e-9))
        return max(count, 0)

    def __str__(self) -> str:
        role = ", head" if self.head else ""
        return (f"{self.ip} ({self.node_id[:8]}{role}): {self.cpus:g} CPU, {self.gpus:g} GPU, "
                f"{self.memory_gb:.1f} GB")


def cluster_nodes() -> list[NodeSize]:
    """The live nodes of the cluster this process is connected to."""
    import ray

    nodes = []
    for node in ray.nodes():
        resources = node.get("Resources") or {}
        if not node.get("Alive") or not resources:
            continue
        nodes.append(NodeSize(
            node_id=str(node["NodeID"]), ip=str(node.get("NodeManagerAddress", "?")),
            cpus=float(resources.get("CPU", 0.0)), gpus=float(resources.get("GPU", 0.0)),
            memory_gb=float(resources.get("memory", 0.0)) / 1e9,
            head="node:__internal_head__" in resources))
    return sorted(nodes, key=lambda n: (not n.head, n.ip, n.node_id))


def check_fits(spec: SimulationSpec, nodes: list[NodeSize], address: str) -> int:
    """How many clients the cluster runs at once; refuses a request no node can host."""
    if not nodes:
        raise ClusterError(f"the Ray cluster at {address} has no live node with resources")
    at_once = sum(n.clients(spec) for n in nodes)
    if at_once == 0:
        gpu_hint = (" (a fraction shares a GPU: 0.25 = four clients per GPU)"
                    if spec.gpus_per_client > 0 else "")
        raise ClusterError(
            f"simulation.cpus_per_client = {spec.cpus_per_client:g} and gpus_per_client = "
            f"{spec.gpus_per_client:g}: no node of the Ray cluster at {address} can host a "
            f"client; its nodes: {'; '.join(str(n) for n in nodes)}. Ask for at most one "
            f"node's CPUs and GPUs per client{gpu_hint}, or add a node that large")
    return at_once


def _probe(address: str) -> None:
    """Fail in seconds when nothing listens at a HOST:PORT address."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # ray.init reports what it cannot parse
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT):
            pass
    except OSError as err:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({err}); start its head with `ray start "
            "--head --port=PORT` and give HOST:PORT, or 'auto' on one of its nodes") from None


@contextlib.contextmanager
def joined(address: str, verbose: bool = False) -> Iterator[list[NodeSize]]:
    """Connect this process to the cluster at ``address``; yields its live nodes and
    disconnects at the end (unless Flower's backend already has)."""
    import ray

    if ray.is_initialized():
        raise ClusterError("this process is already connected to Ray; fedtune joins the "
                           f"cluster at {address} itself (call ray.shutdown() first)")
    _probe(address)
    try:
        ray.init(address=address, logging_level="error", log_to_driver=verbose)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"could not join the Ray cluster at {address}: {err}") from None
    try:
        nodes = cluster_nodes()
        log.info("fedtune: joined the Ray cluster at %s: %s", address,
                 "; ".join(str(n) for n in nodes))
        yield nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
