"""Poisson sampling of a round's clients, as DP-FedAvg (McMahan et al., 2018) runs it.

The amplification by subsampling that the accountant counts on holds when each client
joins a round independently with probability q and nobody who sees the release knows
who did. So under client-level DP every available client is drawn with its own coin
(``random.Random.random`` of a ``secrets.SystemRandom`` in production, a seeded stream
only in a reproducible experiment), the cohort's size varies, and the sum of clipped
updates is divided by the *expected* cohort q * N, which does not depend on who was
drawn. When fewer clients are available than planned, q rises to keep the expected
cohort (capped at 1): the accountant must be charged with the q actually used.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PoissonCohort:
    """One round's draw: who (never to be written anywhere), at which rate, and the fixed
    denominator of the release."""

    members: tuple[int, ...]
    rate: float  # q used: each available client's probability of being drawn
    expected: float  # q * available: what the clipped sum is divided by

    def __repr__(self) -> str:  # a log or traceback must not carry the members
        return (f"PoissonCohort(size={len(self.members)}, rate={self.rate:.4g}, "
                f"expected={self.expected:.4g})")


def rate_for(expected: int, available: int) -> float:
    """The sampling rate that gives ``expected`` clients on average out of ``available``
    (1 when fewer are available)."""
    if expected < 1:
        raise ValueError(f"the expected cohort must be >= 1 client, got {expected}")
    if available < 1:
        raise ValueError(f"no client is available to sample (expected cohort {expected})")
    return min(1.0, expected / available)


def poisson_cohort(available: Sequence[int], expected: int, rng: random.Random
                   ) -> PoissonCohort:
    """Each of ``available`` (client ids) joins independently with probability
    ``rate_for(expected, len(available))``; one coin per client, in sorted order."""
    population = sorted(available)
    rate = rate_for(expected, len(population))
    members = tuple(c for c in population if rng.random() < rate)
    return PoissonCohort(members, rate, rate * len(population))
