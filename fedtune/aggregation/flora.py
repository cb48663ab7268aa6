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

from collections.abc import Sequence
from dataclasses import dataclass

from fedtune.aggregation.base import (
    Aggregator,
    Capabilities,
    common_modules,
    example_weights,
    module_parts,
    next_round,
    require,
)
from fedtune.aggregation.recompress import TruncationReport, stack_and_truncate
from fedtune.aggregation.registry import register
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors
from fedtune.core.lowrank import Split, check_split


def split_top(factors: LoraFactors, rank: int) -> tuple[LoraFactors, LoraFactors]:
    """(first ``rank`` components, the rest) of SVD-ordered factors; either may be empty."""
    k = min(rank, factors.rank)
    top = LoraFactors(A=factors.A[:k], B=factors.B[:, :k], scale=factors.scale)
    rest = LoraFactors(A=factors.A[k:], B=factors.B[:, k:], scale=factors.scale)
    return top, rest


@dataclass(frozen=True)
class FLoRAOptions:
    """``federation.rank_budget`` and ``federation.flora_init``."""

    rank_budget: int = 64  # rank the global adapter is recompressed to each round
    flora_init: str = "fresh"  # clients' LoRA starts "fresh" or from the "global" top

    def __post_init__(self) -> None:
        require(self.rank_budget >= 1, "rank_budget", self.rank_budget, "an integer >= 1")
        require(self.flora_init in ("fresh", "global"), "flora_init", self.flora_init,
                "'fresh' (a new LoRA on top of the frozen global adapter each round) or "
                "'global' (start from the global adapter's top components)")


@register
class FLoRA(TruncationReport, Aggregator):
    """Exact stacking plus recompression of the accumulated update to a rank budget."""

    name = "flora"
    capabilities = Capabilities(mixed_ranks=True, dp_form="dense", client_mode="residual")
    Options = FLoRAOptions
    options: FLoRAOptions

    def __init__(self, options: FLoRAOptions | None = None, /, split: Split = "balanced",
                 **values: object) -> None:
        super().__init__(options, **values)
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

    @property
    def rank_budget(self) -> int:
        return self.options.rank_budget

    @property
    def init(self) -> str:
        return self.options.flora_init

    def dp_release_rank(self, ranks: Sequence[int]) -> int:
        """A dense DP release keeps the rank budget, as every aggregate does."""
        return self.rank_budget

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
