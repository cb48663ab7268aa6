"""FedAvg / FedIT: average A and B separately (same ranks required).

Inexact by design: the product of the averages contains cross terms B_i A_j.
It is the baseline the other methods are measured against. Sparse uploads are merged
entry by entry over the clients that sent each entry (``merge = "mean"``) or by TIES.
"""

from __future__ import annotations

from fedtune.aggregation.base import (
    AggregationError,
    Aggregator,
    Capabilities,
    common_modules,
    example_weights,
    next_round,
)
from fedtune.aggregation.registry import register
from fedtune.aggregation.sparse import (
    EntryMerge,
    MergeOptions,
    field_of,
    module_masks,
    module_starts,
)
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors


@register
class FedAvg(EntryMerge, Aggregator):
    name = "fedavg"
    capabilities = Capabilities(additive=True, merges=True, dp_form="factor")
    Options = MergeOptions
    options: MergeOptions

    def aggregate(
        self, updates: list[ClientUpdate], previous: GlobalAdapter | None
    ) -> GlobalAdapter:
        weights = example_weights(updates)
        merged: dict[str, LoraFactors] = {}
        for module in common_modules(updates):
            parts = [u.factors[module] for u in updates]
            ranks = {p.rank for p in parts}
            if len(ranks) != 1:
                raise AggregationError(
                    f"fedavg needs equal ranks, module {module!r} has ranks {sorted(ranks)}; "
                    "use flora, zeropad, hetlora or flexlora for mixed ranks"
                )
            scales = {p.scale for p in parts}
            if len(scales) != 1:
                raise AggregationError(
                    f"fedavg needs equal scales, module {module!r} has {sorted(scales)}"
                )
            masks = module_masks(updates, module)
            starts = module_starts(updates, module)
            merged[module] = LoraFactors(
                A=self.merge_entries(field_of(parts, "A"), weights, field_of(masks, "A"),
                                     field_of(starts, "A")),
                B=self.merge_entries(field_of(parts, "B"), weights, field_of(masks, "B"),
                                     field_of(starts, "B")),
                scale=parts[0].scale,
            )
        return GlobalAdapter(merged, round=next_round(previous))
