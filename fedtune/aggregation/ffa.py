"""FFA-LoRA: A frozen at a shared seeded initialisation, only B trained and averaged.

With a common A, sum_k p_k s_k B_k A = (sum_k p_k s_k B_k) A: averaging B is exact and
linear in the clients' updates, which is why this is the mode for differential privacy.
The aggregator checks that A really is shared instead of silently averaging it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedtune.aggregation.base import (
    AggregationError,
    Aggregator,
    Capabilities,
    common_modules,
    example_weights,
    module_parts,
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
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors, shared_scale


def _max_difference(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


@register
class FFA(EntryMerge, Aggregator):
    """Average B with example weights (mask-aware for sparse uploads, or TIES); A must be
    identical everywhere."""

    name = "ffa"
    capabilities = Capabilities(additive=True, merges=True, dp_form="factor", freeze_A=True)
    Options = MergeOptions
    options: MergeOptions

    def __init__(self, options: MergeOptions | None = None, /, atol: float = 1e-6,
                 rtol: float = 1e-5, **values: object) -> None:
        super().__init__(options, **values)
        self.atol = atol
        self.rtol = rtol

    def _check_shared_A(self, module: str, reference: Tensor, candidate: Tensor,
                        who: str) -> None:
        if reference.shape != candidate.shape:
            raise AggregationError(
                f"ffa: module {module!r} A of {who} has shape {tuple(candidate.shape)}, "
                f"expected {tuple(reference.shape)} (ffa needs one shared rank)"
            )
        same = torch.allclose(
            candidate.to(reference.dtype), reference, atol=self.atol, rtol=self.rtol
        )
        if not same:
            raise AggregationError(
                f"ffa: module {module!r} A of {who} differs from the shared frozen A by up to "
                f"{_max_difference(reference, candidate):.3g}; was A trained or initialised "
                "with another seed?"
            )

    def _shared_A(self, module: str, updates: list[ClientUpdate],
                  previous: GlobalAdapter | None) -> Tensor:
        reference = updates[0].factors[module].A
        others = [(f"client {u.client_id or i}", u.factors[module].A)
                  for i, u in enumerate(updates)][1:]
        if previous is not None and module in previous.factors:
            others.append(("the previous global adapter", previous.factors[module].A))
        for who, candidate in others:
            self._check_shared_A(module, reference, candidate, who)
        return reference

    def aggregate(
        self, updates: list[ClientUpdate], previous: GlobalAdapter | None
    ) -> GlobalAdapter:
        weights = example_weights(updates)
        merged: dict[str, LoraFactors] = {}
        for module in common_modules(updates):
            parts = module_parts(updates, module)
            A = self._shared_A(module, updates, previous)
            scale = shared_scale(parts)
            fold = [p.scale / scale for p in parts]
            starts = module_starts(updates, module)
            B = self.merge_entries(
                [f * p.B for f, p in zip(fold, parts, strict=True)], weights,
                field_of(module_masks(updates, module), "B"),
                [None if s is None else f * s.B for f, s in zip(fold, starts, strict=True)])
            merged[module] = LoraFactors(A=A, B=B, scale=scale)
        return GlobalAdapter(merged, round=next_round(previous))
