"""HetLoRA: zero-padding weighted by how much each client's update moves the weights.

w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F per module (the "sparsity-weighted"
aggregation of HetLoRA), computed from the factors without forming B_k A_k. Clients that
barely trained (small update) pull the average less than plain example weights would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedtune.aggregation.base import Capabilities, example_weights, module_parts, require
from fedtune.aggregation.registry import register
from fedtune.aggregation.zeropad import PaddingOptions, ZeroPad
from fedtune.core.adapters import ClientUpdate, LoraFactors
from fedtune.core.lowrank import frobenius_norm


def norm_weights(parts: list[LoraFactors]) -> list[float] | None:
    """||s_k B_k A_k||_F normalised to sum 1; None when every update is zero."""
    norms = [abs(p.scale) * frobenius_norm(p.B, p.A) for p in parts]
    total = sum(norms)
    if total == 0.0 or not math.isfinite(total):
        return None
    return [n / total for n in norms]


@dataclass(frozen=True)
class HetLoRAOptions(PaddingOptions):
    """Zero-padding's options plus the clients' rank self-pruning decay factor."""

    prune_gamma: float = 0.0  # in (0, 1); 0 = off (see self_prune_rank)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 <= self.prune_gamma < 1.0, "prune_gamma", self.prune_gamma,
                "a number in [0, 1) (0 = no rank self-pruning)")


@register
class HetLoRA(ZeroPad):
    """Zero-padding with norm-proportional weights (falls back to p_k if all are zero).
    Not additive and no client-level DP: the weights depend on the updates themselves."""

    name = "hetlora"
    capabilities = Capabilities(mixed_ranks=True, merges=True, pads=True, prunes=True)
    Options = HetLoRAOptions
    options: HetLoRAOptions

    def client_weights(self, updates: list[ClientUpdate], module: str) -> list[float]:
        weights = norm_weights(module_parts(updates, module))
        return example_weights(updates) if weights is None else weights


def _tail_and_total(factors: LoraFactors, keep: int) -> tuple[float, float]:
    """(||s B[:, keep:] A[keep:]||_F^2, ||s B A||_F^2) of one module."""
    s2 = factors.scale**2
    tail = frobenius_norm(factors.B[:, keep:], factors.A[keep:])
    total = frobenius_norm(factors.B, factors.A)
    return s2 * tail**2, s2 * total**2


def self_prune_rank(factors: LoraFactors | Mapping[str, LoraFactors], gamma: float) -> int:
    """HetLoRA rank self-pruning: the rank a client should train next round.

    The candidate is ``r' = max(1, floor(gamma * r))`` (gamma in (0, 1) is HetLoRA's
    rank decay factor). The client prunes to r' when the dropped components carry less
    than their share of the update: ``||B[:, r':] A[r':]||_F < (1 - gamma) ||B A||_F``.
    Components of equal strength would carry ``sqrt(1 - gamma) > 1 - gamma``, so only a
    tail that training has left markedly weaker is cut. Given several modules (one
    client's whole adapter, one shared rank) the squared norms are summed. Otherwise
    the rank is kept.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    modules = [factors] if isinstance(factors, LoraFactors) else list(factors.values())
    if not modules:
        raise ValueError("no factors to prune")
    ranks = {f.rank for f in modules}
    if len(ranks) != 1:
        raise ValueError(f"self-pruning needs one rank across modules, got {sorted(ranks)}")
    rank = ranks.pop()
    keep = max(1, math.floor(gamma * rank))
    if keep >= rank:
        return rank
    norms = [_tail_and_total(f, keep) for f in modules]
    tail2 = sum(t for t, _ in norms)
    total2 = sum(n for _, n in norms)
    if total2 > 0.0 and math.sqrt(tail2) < (1.0 - gamma) * math.sqrt(total2):
        return keep
    return rank
