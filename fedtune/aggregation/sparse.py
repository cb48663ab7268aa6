"""Sparsity-aware merging of one tensor across clients: mask-aware mean and TIES.

With sparse uploads a client sends only some entries of each tensor; the rest of its
tensor holds its starting value. A plain weighted average would pull every entry it did
not send back toward that start with its full weight. The mask-aware mean instead
averages each entry over the clients that sent it, with their weights renormalised:

    out[i] = sum_k w_k m_k[i] x_k[i] / sum_k w_k m_k[i]

(an entry nobody sent falls back to the plain weighted average, which is then the
shared starting value). With every mask full it is exactly the weighted average.

TIES (Yadav et al., 2023) works on the updates d_k = x_k - start_k: keep each client's
largest ``density`` fraction of entries (trim), elect each entry's sign by the weighted
total mass sum_k w_k d_k, and average only the kept entries whose sign agrees:

    out = sum_k w_k start_k + sum_k w_k a_k d_k / sum_k w_k a_k    (0 where no k agrees)

where a_k marks the kept, sent entries of client k with the elected sign.
Pure tensors: no Flower, no peft.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedtune.aggregation.base import AggregationError, require
from fedtune.core.adapters import ClientUpdate, LoraFactors, LoraMask

Merge = Literal["mean", "ties"]
MERGES = ("mean", "ties")


def weighted_sum(values: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_k w_k x_k (the dense path every aggregator had)."""
    return sum((w * x for w, x in zip(weights, values, strict=True)), torch.zeros_like(values[0]))


def masked_mean(values: Sequence[Tensor], weights: Sequence[float],
                masks: Sequence[Tensor | None]) -> Tensor:
    """Each entry averaged over the clients whose mask has it, weights renormalised."""
    if all(m is None for m in masks):
        return weighted_sum(values, weights)
    full = [torch.ones_like(x, dtype=torch.bool) if m is None else m
            for x, m in zip(values, masks, strict=True)]
    numerator = weighted_sum([x * m for x, m in zip(values, full, strict=True)], weights)
    denominator = weighted_sum([m.to(values[0].dtype) for m in full], weights)
    sent = denominator > 0
    plain = weighted_sum(values, weights)
    return torch.where(sent, numerator / torch.where(sent, denominator, 1.0), plain)


def trim_to_density(delta: Tensor, density: float) -> Tensor:
    """``delta`` with all but its ceil(density * numel) largest-magnitude entries zeroed."""
    flat = delta.reshape(-1)
    k = math.ceil(density * flat.numel())
    if k >= flat.numel():
        return delta.clone()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)


def ties_merge(values: Sequence[Tensor], weights: Sequence[float],
               masks: Sequence[Tensor | None], starts: Sequence[Tensor],
               density: float) -> Tensor:
    """TIES merge of the clients' updates on top of their weighted mean start."""
    deltas = []
    for x, m, s in zip(values, masks, starts, strict=True):
        d = x - s
        deltas.append(trim_to_density(d if m is None else d * m, density))
    elected = torch.sign(weighted_sum(deltas, weights))
    agree = [(torch.sign(d) == elected) & (d != 0) for d in deltas]
    numerator = weighted_sum([d * a for d, a in zip(deltas, agree, strict=True)], weights)
    denominator = weighted_sum([a.to(numerator.dtype) for a in agree], weights)
    merged = torch.where(denominator > 0, numerator / torch.where(denominator > 0,
                                                                  denominator, 1.0), 0.0)
    return weighted_sum(starts, weights) + merged


def merge_tensors(values: Sequence[Tensor], weights: Sequence[float],
                  masks: Sequence[Tensor | None], starts: Sequence[Tensor | None] | None = None,
                  method: Merge = "mean", density: float = 0.2) -> Tensor:
    """One tensor merged across clients by ``method`` ("mean" or "ties")."""
    if method == "mean":
        return masked_mean(values, weights, masks)
    if method != "ties":
        raise AggregationError(f"unknown merge {method!r}; expected one of {', '.join(MERGES)}")
    if starts is None or any(s is None for s in starts):
        raise AggregationError("ties needs every client's starting point (ClientUpdate.start) "
                               "to take its update from")
    return ties_merge(values, weights, masks, [s for s in starts if s is not None], density)


@dataclass(frozen=True)
class MergeOptions:
    """``federation.merge`` and ``ties_density``: the options of every aggregator that
    combines clients entry by entry."""

    merge: str = "mean"
    ties_density: float = 0.2  # merge = "ties": fraction of each update's entries kept

    def __post_init__(self) -> None:
        require(self.merge in MERGES, "merge", self.merge,
                "'mean' (each entry averaged over the clients that sent it) or 'ties' "
                "(trim, elect a sign, average the entries that agree)")
        require(0.0 < self.ties_density <= 1.0, "ties_density", self.ties_density,
                "a number in (0, 1]")


class EntryMerge:
    """Mixin for aggregators that combine clients entry by entry (fedavg, zeropad,
    hetlora, ffa): the ``merge`` option picks the mask-aware mean or TIES."""

    options: MergeOptions

    @property
    def merge(self) -> Merge:
        return self.options.merge  # type: ignore[return-value]

    @property
    def ties_density(self) -> float:
        return self.options.ties_density

    def merge_entries(self, values: Sequence[Tensor], weights: Sequence[float],
                      masks: Sequence[Tensor | None],
                      starts: Sequence[Tensor | None]) -> Tensor:
        return merge_tensors(values, weights, masks, starts, self.merge, self.ties_density)


def module_masks(updates: Sequence[ClientUpdate], module: str) -> list[LoraMask | None]:
    """Every client's sent-entry mask for one module (None: sent dense)."""
    return [u.mask(module) for u in updates]


def module_starts(updates: Sequence[ClientUpdate], module: str) -> list[LoraFactors | None]:
    """Every client's starting factors for one module, where the server knows them."""
    return [None if u.start is None else u.start.get(module) for u in updates]


def field_of(items: Sequence[LoraFactors | LoraMask | None], name: str) -> list[Tensor | None]:
    """``A`` or ``B`` of each item (None stays None)."""
    return [None if item is None else getattr(item, name) for item in items]
