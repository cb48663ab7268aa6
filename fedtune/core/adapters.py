"""Core data model: LoRA factors, client updates and the server's global adapter.

Pure tensors only (no Flower, no peft) so the aggregation math can be tested and
reused anywhere. The effective weight update of a module is ``scale * B @ A``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: A is [r, in], B is [out, r]; delta = scale * B @ A."""

    A: Tensor
    B: Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise ValueError(
                f"LoRA factors must be 2-D, got A {tuple(self.A.shape)} and B {tuple(self.B.shape)}"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"rank mismatch: A has {self.A.shape[0]} rows but B has {self.B.shape[1]} columns"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def delta(self) -> Tensor:
        """Dense effective update ``scale * B @ A`` (for tests and small models)."""
        return self.scale * (self.B @ self.A)

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.A).all() and torch.isfinite(self.B).all())


@dataclass(frozen=True)
class LoraMask:
    """Which entries of a module's A and B a client actually sent (sparse uploads).

    Entries it did not send hold its starting value in the update's factors; the
    sparsity-aware aggregators average each entry only over the clients that sent it.
    """

    A: Tensor
    B: Tensor

    @staticmethod
    def full(factors: LoraFactors) -> LoraMask:
        """Every entry sent (a dense upload)."""
        return LoraMask(A=torch.ones_like(factors.A, dtype=torch.bool),
                        B=torch.ones_like(factors.B, dtype=torch.bool))


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sent back after local training.

    ``masks`` (module -> LoraMask) is set for sparse uploads; None means every entry was
    sent. ``start`` (module -> factors) is what the client started training from, where
    the server knows it: the reference that update deltas (e.g. for TIES) are taken from.
    """

    factors: dict[str, LoraFactors]
    num_examples: int
    client_id: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    masks: Mapping[str, LoraMask] | None = None
    start: Mapping[str, LoraFactors] | None = None

    def __post_init__(self) -> None:
        if self.num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {self.num_examples}")

    def mask(self, module: str) -> LoraMask | None:
        """The module's sent-entry mask, or None when it was sent dense."""
        return None if self.masks is None else self.masks.get(module)

    @property
    def modules(self) -> list[str]:
        return sorted(self.factors)


class GlobalAdapter:
    """Server state after a round: per-module LoRA factors in factored form.

    Holding factors (never the dense out x in matrix) keeps memory and download size
    bounded by the rank, whatever the aggregator.
    """

    def __init__(self, factors: Mapping[str, LoraFactors], round: int = 0) -> None:
        self.factors: dict[str, LoraFactors] = dict(factors)
        self.round = round

    @property
    def modules(self) -> list[str]:
        return sorted(self.factors)

    def delta(self, module: str) -> Tensor:
        """Dense effective update of one module."""
        if module not in self.factors:
            raise KeyError(
                f"unknown module {module!r}; the adapter has {len(self.factors)} modules"
            )
        return self.factors[module].delta()

    def num_parameters(self) -> int:
        return sum(f.A.numel() + f.B.numel() for f in self.factors.values())

    def __repr__(self) -> str:
        ranks = sorted({f.rank for f in self.factors.values()})
        return f"GlobalAdapter(round={self.round}, modules={len(self.factors)}, ranks={ranks})"


def shared_scale(parts: Sequence[LoraFactors]) -> float:
    """The clients' common scale, or 1.0 when they differ (scales then fold into B)."""
    scales = {p.scale for p in parts}
    return scales.pop() if len(scales) == 1 else 1.0
