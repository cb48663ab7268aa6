"""Multi-Krum (Blanchard et al.) of the clients' updates, in factored form.

Each update D_k is scored by the sum of its squared distances to its n - f - 2 nearest
other updates (at least 1), f = ``krum_byzantine`` the number of attackers tolerated;
the ``krum_keep`` lowest-scored (0: n - f) are averaged with their example weights,
renormalised. The distances come from the K x K Gram matrix of the updates
(``robust``), never from the dense matrices Flower's Krum flattens. Ties go to the
lower client position (updates arrive sorted by partition), so a round is
reproducible.

Refused under secure aggregation and client-level DP: see ``robust`` (why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedtune.aggregation.base import AggregationError, require
from fedtune.aggregation.registry import register
from fedtune.aggregation.robust import RobustCenter, squared_distances


@dataclass(frozen=True)
class MultiKrumOptions:
    """``federation.rank_budget``, ``krum_byzantine`` and ``krum_keep``."""

    rank_budget: int = 64
    krum_byzantine: int = 1  # f: attackers tolerated among a round's replies
    krum_keep: int = 0  # updates averaged; 0 = n - f (1 = plain Krum)

    def __post_init__(self) -> None:
        require(self.rank_budget >= 1, "rank_budget", self.rank_budget, "an integer >= 1")
        require(self.krum_byzantine >= 0, "krum_byzantine", self.krum_byzantine,
                "an integer >= 0")
        require(self.krum_keep >= 0, "krum_keep", self.krum_keep,
                "an integer >= 0 (0 = the replies minus krum_byzantine)")


def krum_scores(squared: Tensor, byzantine: int) -> Tensor:
    """Per update, the sum of squared distances to its n - f - 2 nearest others (>= 1)."""
    n = squared.shape[0]
    neighbours = max(1, n - byzantine - 2)
    if n == 1:
        return torch.zeros(1, dtype=squared.dtype)
    others = squared + torch.diag(torch.full((n,), float("inf"), dtype=squared.dtype))
    return others.sort(dim=1).values[:, : min(neighbours, n - 1)].sum(dim=1)


def selected(scores: Tensor, keep: int) -> list[int]:
    """The ``keep`` lowest scores; ties to the lower index."""
    order = sorted(range(len(scores)), key=lambda k: (float(scores[k]), k))
    return sorted(order[:keep])


@register
class MultiKrum(RobustCenter):
    """Multi-Krum selection, the selected updates averaged, recompressed to the budget."""

    name = "multikrum"
    Options = MultiKrumOptions
    options: MultiKrumOptions

    def __init__(self, options: MultiKrumOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self.last_selected: list[int] = []

    def keep(self, n: int) -> int:
        f, keep = self.options.krum_byzantine, self.options.krum_keep
        count = keep or n - f
        if not 1 <= count <= n:
            raise AggregationError(
                f"multikrum cannot keep {count} of {n} updates (federation.krum_keep = "
                f"{keep}, krum_byzantine = {f}): a round needs more replies than "
                "krum_byzantine")
        return count

    def coefficients(self, gram: Tensor, weights: Tensor) -> Tensor:
        n = gram.shape[0]
        scores = krum_scores(squared_distances(gram), self.options.krum_byzantine)
        self.last_selected = selected(scores, self.keep(n))
        beta = torch.zeros(n, dtype=torch.float64)
        beta[self.last_selected] = weights[self.last_selected]
        return beta / beta.sum()

    def metrics(self) -> dict[str, float]:
        kept = len(self.last_selected)
        return {**super().metrics(), "krum_selected": float(kept),
                "krum_rejected": float(len(self.last_coefficients) - kept)}
