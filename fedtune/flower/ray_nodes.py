"""Which Ray node ran a simulated client, in its train record.

A client's reply carries numbers only (``messages.check_outgoing``), so a client running
in a Ray worker reports its node as two integers: the first 48 bits of the Ray node id
(``ray-node``; exact in a float64, enough to tell a cluster's nodes apart) and the node's
IPv4 address (``ray-node-ip``). The server turns them back into text for the run's
``metrics.jsonl``: ``ray_node_id`` (the full id when the server's process is connected
to the cluster, as under ``fedtune simulate``; else its first 12 hex digits) and
``node_ip``. A client that does not run in a Ray worker (a deployed SuperNode) adds
nothing. Ray is never imported here unless the process already has it.
"""

from __future__ import annotations

import ipaddress
import sys
import threading
from typing import Any

from fedtune.flower import messages as keys

#: hex digits of the node id a client reports (48 bits)
TAG_DIGITS = 12

_lock = threading.Lock()
_known: dict[str, str] = {}  # tag (hex prefix) -> full node id


def _ray() -> Any | None:
    """The ray module when this process is part of a Ray job, else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray


def node_metrics() -> dict[str, int]:
    """The client side: this worker's Ray node as reply metrics (empty outside Ray)."""
    ray = _ray()
    if ray is None:
        return {}
    node_id = ray.get_runtime_context().get_node_id()
    out = {keys.RAY_NODE: int(node_id[:TAG_DIGITS], 16)}
    try:
        ip = ipaddress.ip_address(ray.util.get_node_ip_address())
    except ValueError:
        return out
    if ip.version == 4:
        out[keys.RAY_NODE_IP] = int(ip)
    return out


def full_node_id(tag: str) -> str:
    """The full id of the node whose id starts with ``tag``, when this process can ask
    the cluster (and it knows the node); else ``tag``."""
    with _lock:
        if tag in _known:
            return _known[tag]
    ray = _ray()
    if ray is None:
        return tag
    try:
        ids = [str(n["NodeID"]) for n in ray.nodes()]
    except Exception:  # noqa: BLE001 - naming a node must never fail a record
        return tag
    with _lock:
        _known.update({i[:TAG_DIGITS]: i for i in ids})
        return _known.get(tag, tag)


def describe(record: dict[str, Any]) -> dict[str, Any]:
    """The server side: a client record with its node numbers as ``ray_node_id`` and
    ``node_ip`` (the record itself, unchanged, when it has none)."""
    node_key, ip_key = keys.RAY_NODE.replace("-", "_"), keys.RAY_NODE_IP.replace("-", "_")
    if node_key not in record:
        return record
    out = dict(record)
    tag = f"{int(out.pop(node_key)):0{TAG_DIGITS}x}"
    out["ray_node_id"] = full_node_id(tag)
    ip = out.pop(ip_key, None)
    if ip is not None:
        out["node_ip"] = str(ipaddress.IPv4Address(int(ip)))
    return out
