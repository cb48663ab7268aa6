"""Which simulated node holds which partition, without asking a thousand nodes.

Flower's simulation engine gives each virtual SuperNode a random node id and a
``partition-id`` in its node config; the ServerApp sees only the ids. Asking every node
(one query message each) costs a Ray task per client before the first round: minutes at
1,000 clients on a laptop. ``fedtune simulate`` runs the engine in its own process, so
it records the engine's own id -> partition mapping as the nodes are registered and the
strategy reads it here. Anything else (``flwr run``, deployment, another flwr version
without the hook) leaves it empty and the strategy asks the nodes as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

_lock = threading.Lock()
_partitions: dict[int, int] = {}


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """While the simulation engine runs, remember the node -> partition mapping it makes."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:  # pragma: no cover - another flwr layout: fall back to queries
        yield
        return
    original: Callable[..., dict[int, int]] | None = getattr(vce_api, "_register_nodes", None)
    if original is None:  # pragma: no cover
        yield
        return

    def register(*args: Any, **kwargs: Any) -> dict[int, int]:
        mapping = original(*args, **kwargs)
        with _lock:
            _partitions.clear()
            _partitions.update({int(n): int(p) for n, p in mapping.items()})
        return mapping

    vce_api._register_nodes = register
    try:
        yield
    finally:
        vce_api._register_nodes = original
        with _lock:
            _partitions.clear()


def partitions() -> dict[int, int]:
    """The recorded mapping (empty outside ``recording``)."""
    with _lock:
        return dict(_partitions)
