"""FlexLoRA: average the full updates, then redistribute by truncated SVD.

W = sum_k p_k s_k B_k A_k is kept in factored form (stacking, no cross terms) and its
SVD comes from the small core (``fedtune.core.lowrank``), not from a dense out x in
SVD as in FlexLoRA's reference code. Client k downloads the best rank-r_k
approximation of W, expressed in its own scale, and keeps training it.
"""

from __future__ import annotations

from fedtune.aggregation.base import (
    Aggregator,
    Capabilities,
    NoOptions,
    common_modules,
    example_weights,
    module_parts,
    next_round,
    with_scale,
)
from fedtune.aggregation.recompress import TruncationReport, stack_and_truncate
from fedtune.aggregation.registry import register
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors
from fedtune.core.lowrank import Split, check_split, truncate


def best_rank(factors: LoraFactors, rank: int, split: Split = "balanced") -> LoraFactors:
    """Best rank-``rank`` approximation of ``scale * B @ A`` as factors with scale 1."""
    result = truncate(factors.B * factors.scale, factors.A, rank, split=split)
    return LoraFactors(A=result.A, B=result.B, scale=1.0)


@register
class FlexLoRA(TruncationReport, Aggregator):
    """Weighted average of full updates, truncated SVD per client rank. Client-level DP
    noise goes on the dense average (before its SVD); its weights are example weights."""

    name = "flexlora"
    capabilities = Capabilities(mixed_ranks=True, dp_form="dense")
    Options = NoOptions

    def __init__(self, options: NoOptions | None = None, /, max_rank: int | None = None,
                 split: Split = "balanced") -> None:
        super().__init__(options)
        if max_rank is not None and max_rank < 1:
            raise ValueError(f"max_rank must be at least 1, got {max_rank}")
        #: Rank the global adapter keeps; None: the largest client rank of the round.
        self.max_rank = max_rank
        self.split: Split = check_split(split)
        self.last_truncation_errors: dict[str, float] = {}

    def aggregate(
        self, updates: list[ClientUpdate], previous: GlobalAdapter | None
    ) -> GlobalAdapter:
        weights = example_weights(updates)
        merged: dict[str, LoraFactors] = {}
        errors: dict[str, float] = {}
        for module in common_modules(updates):
            parts = module_parts(updates, module)
            keep = self.max_rank or max(p.rank for p in parts)
            merged[module], errors[module] = stack_and_truncate(parts, weights, keep,
                                                                self.split)
        self.last_truncation_errors = errors
        return GlobalAdapter(merged, round=next_round(previous))

    def payload_for(
        self, adapter: GlobalAdapter, rank: int, scale: float | None = None
    ) -> dict[str, LoraFactors]:
        """Top-``rank`` SVD factors of every module, so ``scale * B @ A`` is the best
        rank-``rank`` approximation of the global update."""
        top = {name: best_rank(f, rank, self.split) for name, f in adapter.factors.items()}
        return with_scale(top, scale)
