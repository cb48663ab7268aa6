"""Geometric median of the clients' updates (RFA: smoothed Weiszfeld), in factored form.

The aggregate minimises sum_k p_k max(nu, ||z - D_k||) over z: unlike the mean, a
minority of clients cannot drag it arbitrarily far (breakdown point 1/2 of the weight).
Weiszfeld's iteration keeps z = sum_k beta_k D_k a combination of the updates, so it
runs on the K x K Gram matrix alone (``robust``): beta_k <- p_k / max(nu, ||z - D_k||),
normalised, starting from the weighted mean, until z moves by at most ``gm_tolerance``
of its norm or ``gm_iterations`` pass. ``gm_smoothing`` (nu) keeps a weight finite when z
sits on an update (Pillutla et al.'s smoothing), in the updates' own Frobenius units.

Refused under secure aggregation and client-level DP: see ``robust`` (why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from fedtune.aggregation.base import require
from fedtune.aggregation.registry import register
from fedtune.aggregation.robust import RobustCenter, combination_norm, distances_to_combination


@dataclass(frozen=True)
class GeoMedianOptions:
    """``federation.rank_budget``, ``gm_smoothing``, ``gm_iterations``, ``gm_tolerance``."""

    rank_budget: int = 64
    gm_smoothing: float = 1e-6  # nu: distances below it count as nu
    gm_iterations: int = 100  # at most this many Weiszfeld steps
    gm_tolerance: float = 1e-8  # stop when z moves by at most this fraction of ||z||

    def __post_init__(self) -> None:
        require(self.rank_budget >= 1, "rank_budget", self.rank_budget, "an integer >= 1")
        require(math.isfinite(self.gm_smoothing) and self.gm_smoothing > 0, "gm_smoothing",
                self.gm_smoothing, "a number > 0")
        require(self.gm_iterations >= 1, "gm_iterations", self.gm_iterations,
                "an integer >= 1")
        require(math.isfinite(self.gm_tolerance) and self.gm_tolerance >= 0, "gm_tolerance",
                self.gm_tolerance, "a number >= 0")


def weiszfeld_step(gram: Tensor, beta: Tensor, weights: Tensor, smoothing: float) -> Tensor:
    """One smoothed Weiszfeld step on the coefficients."""
    inverse = weights / distances_to_combination(gram, beta).clamp_min(smoothing)
    return inverse / inverse.sum()


@register
class GeoMedian(RobustCenter):
    """Smoothed geometric median (RFA) of the updates, recompressed to the rank budget."""

    name = "geomedian"
    Options = GeoMedianOptions
    options: GeoMedianOptions

    def __init__(self, options: GeoMedianOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self.last_iterations = 0

    def coefficients(self, gram: Tensor, weights: Tensor) -> Tensor:
        o = self.options
        beta, step = weights.clone(), 0
        while step < o.gm_iterations:
            step += 1
            new = weiszfeld_step(gram, beta, weights, o.gm_smoothing)
            moved = combination_norm(gram, new - beta)
            beta = new
            if moved <= o.gm_tolerance * combination_norm(gram, beta):
                break
        self.last_iterations = step
        return beta

    def metrics(self) -> dict[str, float]:
        smallest = min(self.last_coefficients, default=0.0)
        return {**super().metrics(), "gm_iterations": float(self.last_iterations),
                "gm_weight_min": smallest}

