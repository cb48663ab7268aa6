"""FLoRA stacking, with the accumulated update held as a recompressed global adapter.

This round's contribution is B = [s_1 B_1, ..., s_K B_K], A = [p_1 A_1; ...; p_K A_K],
so B A = sum_k p_k s_k B_k A_k exactly for any mix of ranks. Unlike FLoRA, which merges
that into the (possibly 4-bit) base weights and restarts, the server keeps the running
sum of all rounds as a full-precision adapter: previous and this round are stacked and
recompressed (factored SVD) to ``rank_budget``, so the download is bounded by the budget,
not by the number of clients. Clients apply it frozen and train a fresh LoRA on top
("residual" client mode); that fresh LoRA is what they send back.

With ``init="global"`` a client of rank r instead starts its LoRA from the global
adapter's top-r components (``split_top``) and applies only the rest frozen, so its
model starts exactly at the global one; what it sends is then its whole final LoRA, and
the server subtracts the top-r part it started from:
new = previous + sum_k p_k (s_k B_k A_k - top_{r_k}(previous)), still exact by stacking.
This relies on the global factors being in SVD order, which ``truncate`` guarantees.
"""

from __future__ import annotations

from fedtune.aggregation.base import (
    Aggregator,
    common_modules,
    example_weights,
    module_parts,
    next_round,
)
from fedtune.aggregation.recompress import TruncationReport, stack_and_truncate
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors
from fedtune.core.lowrank import Split, check_split


def split_top(factors: LoraFactors, rank: int) -> tuple[LoraFactors, LoraFactors]:
    """(first ``rank`` components, the rest) of SVD-ordered factors; either may be empty."""
    k = min(rank, factors.rank)
    top = LoraFactors(A=factors.A[:k], B=factors.B[:, :k], scale=factors.scale)
    rest = LoraFactors(A=factors.A[k:], B=factors.B[:, k:], scale=factors.scale)
    return top, rest


class FLoRA(TruncationReport, Aggregator):
    """Exact stacking plus recompression of the accumulated update to a rank budget."""

    name = "flora"
    requires_equal_ranks = False
    client_mode = "residual"

    def __init__(self, rank_budget: int = 64, split: Split = "balanced",
                 init: str = "fresh") -> None:
        if rank_budget < 1:
            raise ValueError(f"rank_budget must be at least 1, got {rank_budget}")
        if init not in ("fresh", "global"):
            raise ValueError(f"init must be 'fresh' or 'global', got {init!r}")
        self.rank_budget = rank_budget
        self.init = init
        self.split: Split = check_split(split)
        #: Per module, ||exact - recompressed||_F / ||exact||_F of the last aggregate, where
        #: "exact" is previous (as stored) + this round: the error this round's step added.
        self.last_truncation_errors: dict[str, float] = {}

    def _accumulate(self, parts: list[LoraFactors], weights: list[float],
                    carried: LoraFactors | None) -> tuple[LoraFactors, float]:
        """Stack previous (weight 1) with this round and recompress to the budget."""
        members = parts if carried is None else [carried, *parts]
        member_weights = weights if carried is None else [1.0, *weights]
        if carried is not None and self.init == "global":  # what each client started from
            members = [*members, *(split_top(carried, p.rank)[0] for p in parts)]
            member_weights = [*member_weights, *(-w for w in weights)]
        return stack_and_truncate(members, member_weights, self.rank_budget, self.split)

    def aggregate(
        self, updates: list[ClientUpdate], previous: GlobalAdapter | None
    ) -> GlobalAdapter:
        weights = example_weights(updates)
        carried = {} if previous is None else dict(previous.factors)
        merged: dict[str, LoraFactors] = {}
        errors: dict[str, float] = {}
        for module in common_modules(updates):
            parts = module_parts(updates, module)
            merged[module], errors[module] = self._accumulate(
                parts, weights, carried.pop(module, None)
            )
        merged.update(carried)  # modules nobody trained this round keep their update
        self.last_truncation_errors = errors
        return GlobalAdapter(merged, round=next_round(previous))
