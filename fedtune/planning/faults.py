"""Simulated faults: clients that drop out of a round and clients too slow for its deadline.

A simulation on one machine runs every client at the same speed and never loses one;
real federations do both. Per round, each sampled client (in partition order, from a
generator seeded by the run seed and the round) drops out with ``simulation.dropout``,
and otherwise needs *device time* = its tokens of work / (reference throughput x its
profile's ``speed_factor``) x a lognormal jitter; past ``simulation.round_deadline`` it
is a straggler whose update would arrive too late. Neither is sent the round's work, so
a draw costs nothing and the counts are exactly what the seed says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fedtune.core.seeds import stream


class FaultSpec(Protocol):
    dropout: float
    round_deadline: float
    reference_tokens_per_s: float
    time_jitter: float


@dataclass(frozen=True)
class RoundFaults:
    """Partitions that dropped out or straggled this round, and every sampled client's
    simulated device seconds (dropped ones have none)."""

    dropped: tuple[int, ...] = ()
    stragglers: tuple[int, ...] = ()
    device_seconds: dict[int, float] = field(default_factory=dict)

    @property
    def lost(self) -> set[int]:
        return {*self.dropped, *self.stragglers}


def faults_active(spec: FaultSpec) -> bool:
    return spec.dropout > 0 or spec.round_deadline > 0


def draw_faults(partitions: Iterable[int], work_tokens: Mapping[int, float],
                speed: Mapping[int, float], spec: FaultSpec, seed: int, server_round: int
                ) -> RoundFaults:
    """The round's seeded draw: two numbers per client in partition order (so a client's
    fate does not depend on which others were sampled beyond the order)."""
    rng = stream(seed, "faults", server_round)
    dropped, stragglers, seconds = [], [], {}
    for partition in sorted(partitions):
        leaves = rng.random() < spec.dropout
        jitter = rng.lognormvariate(0.0, spec.time_jitter) if spec.time_jitter else 1.0
        if leaves:
            dropped.append(partition)
            continue
        rate = spec.reference_tokens_per_s * speed.get(partition, 1.0)
        seconds[partition] = work_tokens[partition] / rate * jitter
        if spec.round_deadline and seconds[partition] > spec.round_deadline:
            stragglers.append(partition)
    return RoundFaults(tuple(dropped), tuple(stragglers), seconds)
