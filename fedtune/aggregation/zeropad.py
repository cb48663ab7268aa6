"""Zero-padding: pad every client to the largest rank, average, hand out slices.

Client k's A_k [r_k, in] becomes [A_k; 0] and B_k [out, r_k] becomes [B_k, 0]; A and
B are averaged separately (so, like FedAvg, the product has cross terms) and client k
downloads the first r_k rows of A and columns of B. Sparse uploads are merged entry by
entry over the clients that sent each entry, or by TIES. ``padding = "skip"`` drops the
padding altogether: each rank component is averaged over the clients that have it, so a
high-rank client's extra components are not shrunk by everyone else's zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedtune.aggregation.base import (
    Aggregator,
    Capabilities,
    common_modules,
    example_weights,
    module_parts,
    next_round,
    require,
    with_scale,
)
from fedtune.aggregation.registry import register
from fedtune.aggregation.sparse import (
    EntryMerge,
    MergeOptions,
    field_of,
    merge_tensors,
    module_masks,
    module_starts,
)
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors, LoraMask, shared_scale
from fedtune.core.lowrank import pad_cols, pad_rows

PADDINGS = ("zeros", "skip")


def padded_masks(tensors: Sequence[Tensor], masks: Sequence[Tensor | None], rows: int,
                 padding: str) -> list[Tensor | None]:
    """Masks of row-padded tensors (rank along dim 0) for the mask-aware merge.

    "zeros" (classic zero-padding): a padded row is a zero the client contributes to
    every entry some client with that component sent; an entry nobody sent falls back to
    the plain zero-padding average (so with dense uploads this is exactly zero-padding).
    "skip": padding is never counted; each component is averaged over the clients that
    have it. None everywhere means the plain weighted average."""
    if all(m is None for m in masks) and (padding == "zeros"
                                          or all(t.shape[0] == rows for t in tensors)):
        return list(masks)
    own = [torch.cat([m, m.new_zeros(rows - m.shape[0], m.shape[1])])
           for m in (torch.ones_like(t, dtype=torch.bool) if m is None else m
                     for t, m in zip(tensors, masks, strict=True))]
    if padding == "skip":
        return own
    someone = torch.stack(own).any(dim=0)
    return [torch.cat([m[: t.shape[0]], someone[t.shape[0]:]])
            for t, m in zip(tensors, own, strict=True)]


def padded_average(parts: Sequence[LoraFactors], weights: Sequence[float],
                   masks: Sequence[LoraMask | None] | None = None,
                   starts: Sequence[LoraFactors | None] | None = None,
                   merge: EntryMerge | None = None, padding: str = "zeros") -> LoraFactors:
    """Weighted (mask-aware where masks are given) merge of zero-padded A and B.

    Clients that share a scale keep it; with mixed scales (peft's alpha / r differs
    with r) each B_k is first multiplied by s_k, so the result has scale 1.0.
    """
    merge_entries = merge.merge_entries if merge is not None else merge_tensors
    masks = masks or [None] * len(parts)
    starts = starts or [None] * len(parts)
    r_max = max(p.rank for p in parts)
    scale = shared_scale(parts)
    fold = [p.scale / scale for p in parts]
    mask_a = padded_masks(field_of(parts, "A"), field_of(masks, "A"), r_max, padding)
    mask_bt = padded_masks([p.B.T for p in parts],
                           [None if m is None else m.T for m in field_of(masks, "B")],
                           r_max, padding)
    A = merge_entries(
        [pad_rows(p.A, r_max) for p in parts], weights, mask_a,
        [None if s is None else pad_rows(s.A, r_max) for s in starts])
    B = merge_entries(
        [f * pad_cols(p.B, r_max) for f, p in zip(fold, parts, strict=True)], weights,
        [None if m is None else m.T for m in mask_bt],
        [None if s is None else f * pad_cols(s.B, r_max)
         for f, s in zip(fold, starts, strict=True)])
    return LoraFactors(A=A, B=B, scale=scale)


def slice_rank(factors: LoraFactors, rank: int) -> LoraFactors:
    """The first ``rank`` components (A[:r], B[:, :r]); the whole thing if it is smaller."""
    return LoraFactors(A=factors.A[:rank], B=factors.B[:, :rank], scale=factors.scale)


@dataclass(frozen=True)
class PaddingOptions(MergeOptions):
    """The entry merge options plus ``federation.padding``."""

    padding: str = "zeros"  # "zeros" (classic) or "skip" (see ZeroPad)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.padding in PADDINGS, "padding", self.padding,
                "'zeros' (padding counts as zeros) or 'skip' (each rank component averaged "
                "over the clients that have it)")


@register
class ZeroPad(EntryMerge, Aggregator):
    """Zero-padded weighted average with example weights p_k (``padding = "skip"``:
    each rank component averaged over the clients that have it)."""

    name = "zeropad"
    capabilities = Capabilities(mixed_ranks=True, additive=True, merges=True, pads=True,
                                dp_form="factor")
    Options = PaddingOptions
    options: PaddingOptions

    @property
    def padding(self) -> str:
        return self.options.padding

    def client_weights(self, updates: list[ClientUpdate], module: str) -> list[float]:
        """Weights of the average for one module: p_k here, overridden by hetlora."""
        return example_weights(updates)

    def aggregate(
        self, updates: list[ClientUpdate], previous: GlobalAdapter | None
    ) -> GlobalAdapter:
        example_weights(updates)  # rejects an empty round with a clear error
        merged = {
            module: padded_average(
                module_parts(updates, module), self.client_weights(updates, module),
                module_masks(updates, module), module_starts(updates, module), self,
                self.padding,
            )
            for module in common_modules(updates)
        }
        return GlobalAdapter(merged, round=next_round(previous))

    def payload_for(
        self, adapter: GlobalAdapter, rank: int, scale: float | None = None
    ) -> dict[str, LoraFactors]:
        """The first ``rank`` components of every module."""
        sliced = {name: slice_rank(f, rank) for name, f in adapter.factors.items()}
        return with_scale(sliced, scale)
