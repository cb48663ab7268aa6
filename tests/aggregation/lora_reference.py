"""Random LoRA factors and an independent dense float64 reference for the aggregation tests.

The reference forms B @ A densely on purpose; fedtune itself never does."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.core.adapters import ClientUpdate, LoraFactors

OUT, IN = 48, 40


def make_update(
    gen: torch.Generator,
    rank: int,
    num_examples: int,
    scale: float = 1.0,
    modules: Sequence[str] = ("q", "v"),
    dtype: torch.dtype = torch.float32,
    client_id: str = "",
) -> ClientUpdate:
    factors = {
        m: LoraFactors(
            A=torch.randn(rank, IN, generator=gen, dtype=torch.float64).to(dtype),
            B=torch.randn(OUT, rank, generator=gen, dtype=torch.float64).to(dtype),
            scale=scale,
        )
        for m in modules
    }
    return ClientUpdate(factors=factors, num_examples=num_examples, client_id=client_id)


def dense(f: LoraFactors) -> torch.Tensor:
    """scale * B @ A formed densely in float64: the reference, never used by fedtune."""
    return f.scale * (f.B.double() @ f.A.double())


def exact_average(updates: Sequence[ClientUpdate], module: str) -> torch.Tensor:
    """sum_k p_k s_k B_k A_k, densely in float64."""
    total = sum(u.num_examples for u in updates)
    return sum(u.num_examples / total * dense(u.factors[module]) for u in updates)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
