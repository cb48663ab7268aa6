"""Clipping a client's whole contribution to an L2 bound C (the sensitivity of the sum).

The norm is taken over everything the mechanism adds up for that client, all modules
together, because that is what one client can change in the released sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from torch import Tensor

from fedtune.core.lowrank import frobenius_norm


class Clipped(NamedTuple):
    """The clipped tensors, the norm before clipping and the factor applied (<= 1)."""

    tensors: dict[str, Tensor]
    norm: float
    factor: float


def total_norm(tensors: Mapping[str, Tensor]) -> float:
    """L2 norm of all tensors taken as one vector (computed in float64)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip_factor(norm: float, bound: float) -> float:
    """min(1, C / norm): contributions under the bound are left exactly as they are."""
    if bound <= 0 or not math.isfinite(bound):
        raise ValueError(f"clip norm must be a finite number > 0, got {bound}")
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip a contribution whose norm is {norm}")
    return 1.0 if norm <= bound else bound / norm


def clip_to_norm(tensors: Mapping[str, Tensor], bound: float) -> Clipped:
    """Scale every tensor by min(1, C / ||all||) so their joint L2 norm is at most C."""
    norm = total_norm(tensors)
    factor = clip_factor(norm, bound)
    scaled = dict(tensors) if factor == 1.0 else {k: t * factor for k, t in tensors.items()}
    return Clipped(scaled, norm, factor)


def product_norm(pairs: Mapping[str, tuple[Tensor, Tensor]]) -> float:
    """sqrt(sum_m ||B_m A_m||_F^2) over modules, each from R x R Gram matrices: the norm of
    a whole LoRA update in weight space without forming any out x in matrix."""
    return math.sqrt(sum(frobenius_norm(B, A) ** 2 for B, A in pairs.values()))
