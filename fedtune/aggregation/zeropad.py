"""Zero-padding: pad every client to the largest rank, average, hand out slices.

Client k's A_k [r_k, in] becomes [A_k; 0] and B_k [out, r_k] becomes [B_k, 0]; A and
B are averaged separately (so, like FedAvg, the product has cross terms) and client k
downloads the first r_k rows of A and columns of B. Sparse uploads are merged entry by
entry over the clients that sent each entry (a sparse client's padding is not an entry it
sent), or by TIES.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedtune.aggregation.base import (
    Aggregator,
    common_modules,
    example_weights,
    module_parts,
    next_round,
    shared_scale,
    with_scale,
)
from fedtune.aggregation.sparse import EntryMerge, field_of, module_masks, module_starts
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors, LoraMask


def pad_rows(t: Tensor, rows: int) -> Tensor:
    """Append zero rows up to ``rows``."""
    extra = rows - t.shape[0]
    return t if extra == 0 else torch.cat([t, t.new_zeros(extra, t.shape[1])])


def pad_cols(t: Tensor, cols: int) -> Tensor:
    """Append zero columns up to ``cols``."""
    return pad_rows(t.T, cols).T


def _padded_mask(mask: Tensor | None, rows: int, transpose: bool) -> Tensor | None:
    """A sparse client's mask padded like its tensor. The padding is not an entry it sent:
    rows beyond its rank average over the clients that have them, and only an entry
    nobody sent falls back to the dense zero-padding average. A dense client (None) keeps
    the plain zero-padding semantics, padding included."""
    if mask is None:
        return None
    t = mask.T if transpose else mask
    extra = rows - t.shape[0]
    padded = torch.cat([t, t.new_zeros(extra, t.shape[1])]) if extra else t
    return padded.T if transpose else padded


def padded_average(parts: Sequence[LoraFactors], weights: Sequence[float],
                   masks: Sequence[LoraMask | None] | None = None,
                   starts: Sequence[LoraFactors | None] | None = None,
                   merge: EntryMerge | None = None) -> LoraFactors:
    """Weighted (by default mask-aware) merge of zero-padded A and B.

    Clients that share a scale keep it; with mixed scales (peft's alpha / r differs
    with r) each B_k is first multiplied by s_k, so the result has scale 1.0.
    """
    merge = merge or EntryMerge()
    masks = masks or [None] * len(parts)
    starts = starts or [None] * len(parts)
    r_max = max(p.rank for p in parts)
    scale = shared_scale(parts)
    fold = [p.scale / scale for p in parts]
    A = merge.merge_entries(
        [pad_rows(p.A, r_max) for p in parts], weights,
        [_padded_mask(m, r_max, False) for m in field_of(masks, "A")],
        [None if s is None else pad_rows(s.A, r_max) for s in starts])
    B = merge.merge_entries(
        [f * pad_cols(p.B, r_max) for f, p in zip(fold, parts, strict=True)], weights,
        [_padded_mask(m, r_max, True) for m in field_of(masks, "B")],
        [None if s is None else f * pad_cols(s.B, r_max)
         for f, s in zip(fold, starts, strict=True)])
    return LoraFactors(A=A, B=B, scale=scale)


def slice_rank(factors: LoraFactors, rank: int) -> LoraFactors:
    """The first ``rank`` components (A[:r], B[:, :r]); the whole thing if it is smaller."""
    return LoraFactors(A=factors.A[:rank], B=factors.B[:, :rank], scale=factors.scale)


class ZeroPad(EntryMerge, Aggregator):
    """Zero-padded weighted average with example weights p_k."""

    name = "zeropad"
    requires_equal_ranks = False

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
