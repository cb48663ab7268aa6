"""What the server measured in one round: bytes from the actual arrays, the clients that
took part, and every client that did not (dropped reply, straggler, simulated fault),
each with its reason. The strategy counts; the round loop writes it into the round's
record."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fedtune.planning.faults import RoundFaults

log = logging.getLogger("fedtune")


@dataclass
class RoundStats:
    """One round's measurements (a fresh one each round)."""

    bytes_down: int = 0
    bytes_up: int = 0
    bytes_up_dense: int = 0  # the same updates as dense fp32 data
    down_by_node: dict[int, int] = field(default_factory=dict)
    sampled: int = 0
    nodes: list[int] = field(default_factory=list)  # the nodes sent work this round
    dropped: list[str] = field(default_factory=list)
    stragglers: int = 0  # sampled nodes with no reply before the round deadline
    dropouts: int = 0  # sampled clients a simulated fault took out (fedtune.planning.faults)
    #: partitions sampled this round, and those a simulated fault took out
    partitions: list[int] = field(default_factory=list)
    dropped_out: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    #: message id -> node it went to; a SuperLink answers for a node it lost (Node
    #: Unavailable) from its own node id, so such replies are traced back through this
    message_node: dict[str, int] = field(default_factory=dict)
    client_records: list[dict[str, Any]] = field(default_factory=list)

    def count_faults(self, faults: RoundFaults, keep_who: bool = True) -> None:
        """Count a round's simulated faults; ``keep_who=False`` (client-level DP, where
        the sample is secret) keeps the counts only."""
        self.dropouts = len(faults.dropped)
        self.stragglers += len(faults.stragglers)
        if keep_who:
            self.dropped_out, self.late = list(faults.dropped), list(faults.stragglers)

    def count_stragglers(self, server_round: int, answered: set[int], timeout: float,
                         name_nodes: bool = True) -> None:
        """Nodes sent work that sent nothing before the round deadline (slow, crashed or
        disconnected): dropped from the round and counted (``name_nodes=False``: without
        saying which, under client-level DP)."""
        for node in self.nodes:
            if node not in answered:
                self.stragglers += 1
                who = f"node {node}" if name_nodes else "a sampled client"
                self.dropped.append(
                    f"{who}: no reply within federation.round_timeout = {timeout:g} s")
                log.warning("round %d: %s sent no reply before the deadline",
                            server_round, who)


def client_time_breakdown(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean per-client seconds for model load, training and serialisation."""
    if not records:
        return {}
    out = {}
    for key in ("seconds_load", "seconds_train", "seconds_codec", "peak_memory_mb"):
        values = [float(r[key]) for r in records if key in r]
        if values:
            out[f"client_{key}_mean" if key != "peak_memory_mb" else "peak_memory_mb_max"] = (
                sum(values) / len(values) if key != "peak_memory_mb" else max(values)
            )
    return out
