"""Bounded influence: no reply moves the aggregate more than an honest client can.

Every aggregator weighs a client by what it says (its example count) and by what it
sends (its update); an admitted client can lie about both. Before a round is
aggregated (without client-level DP, whose clip is the bound and whose weights are
equal) each update is clipped to ``median_norm_multiple`` times the round's median
update norm and each example count capped at ``median_weight_multiple`` times the
round's median count. With an honest majority both medians are honest values, so one
client's pull on a weighted mean is bounded by a few honest clients' worth whatever it
sends, while honest clients (whose norms and sizes are within a few medians) are left
as they are. The bounds actually used are recorded in every round's metrics.

The norm is the one ``federation.max_update_norm`` holds a reply to: the L2 norm of
the factor update (A - A_start, B - B_start) over every module, and clipping scales
that update: A <- A_start + c (A - A_start), B likewise. For the stacking aggregators
(residual client mode, B_start = 0) that bounds s B A as well: ||s B A|| <= s ||B||
||A|| with ||B|| and ||A - A_start|| at most the bound and A_start public.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace

from fedtune.aggregation.base import AggregationError, require
from fedtune.core.adapters import ClientUpdate, LoraFactors


def factor_update_norm(update: ClientUpdate) -> float:
    """||(A - A_start, B - B_start)|| over every module (start cut to the update's rank)."""
    start = _start_of(update)
    total = 0.0
    for name, f in update.factors.items():
        s = start[name]
        total += float((f.A.double() - s.A[: f.rank].double()).pow(2).sum()
                       + (f.B.double() - s.B[:, : f.rank].double()).pow(2).sum())
    return math.sqrt(total)


def _start_of(update: ClientUpdate) -> dict[str, LoraFactors]:
    if update.start is None or set(update.start) < set(update.factors):
        raise AggregationError(f"client {update.client_id or '?'}: bounding its influence "
                               "needs the start it trained from (ClientUpdate.start)")
    return dict(update.start)


def scaled_update(update: ClientUpdate, factor: float) -> ClientUpdate:
    """The update with its move from the start scaled by ``factor``."""
    start = _start_of(update)
    moved = {}
    for name, f in update.factors.items():
        s = start[name]
        a0, b0 = s.A[: f.rank].to(f.A.dtype), s.B[:, : f.rank].to(f.B.dtype)
        moved[name] = LoraFactors(A=a0 + factor * (f.A - a0), B=b0 + factor * (f.B - b0),
                                  scale=f.scale)
    return replace(update, factors=moved)


@dataclass
class InfluenceBound:
    """``federation.median_norm_multiple`` and ``median_weight_multiple`` (0 = off)."""

    median_norm_multiple: float = 3.0
    median_weight_multiple: float = 4.0
    #: what the last round used: the norm bound, the example cap, how many were cut
    last: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("median_norm_multiple", "median_weight_multiple"):
            value = getattr(self, key)
            require(math.isfinite(value) and (value == 0 or value >= 1), key, value,
                    "0 (off) or a number >= 1 (a multiple of the round's median)")

    @property
    def active(self) -> bool:
        return self.median_norm_multiple > 0 or self.median_weight_multiple > 0

    def apply(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """The round's updates with norms clipped and example counts capped."""
        self.last = {}
        if not updates:
            return updates
        if self.median_weight_multiple > 0:
            updates = self._cap_weights(updates)
        if self.median_norm_multiple > 0:
            updates = self._clip_norms(updates)
        return updates

    def _cap_weights(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        median = statistics.median(u.num_examples for u in updates)
        cap = max(1, math.floor(self.median_weight_multiple * median))
        self.last["influence-examples-cap"] = float(cap)
        self.last["influence-capped"] = float(sum(u.num_examples > cap for u in updates))
        return [replace(u, num_examples=cap) if u.num_examples > cap else u for u in updates]

    def _clip_norms(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        norms = [factor_update_norm(u) for u in updates]
        bound = self.median_norm_multiple * statistics.median(norms)
        self.last["influence-norm-bound"] = bound
        self.last["influence-norm-median"] = statistics.median(norms)
        self.last["influence-clipped"] = float(sum(n > bound for n in norms))
        return [scaled_update(u, bound / n) if n > bound else u
                for u, n in zip(updates, norms, strict=True)]

    def metrics(self) -> dict[str, float]:
        return dict(self.last)
