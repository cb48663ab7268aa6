"""The aggregator contract shared by every method.

An aggregator is a pure function of the replies of one round (and the previous
global adapter): randomness only through an explicit generator, no I/O, no Flower.
Class attributes tell the client side how to use what it downloads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors

ClientMode = Literal["continue", "residual"]


class AggregationError(ValueError):
    """The updates of a round cannot be combined by this aggregator."""


class Aggregator(ABC):
    """Base class: subclasses implement :meth:`aggregate`."""

    name: ClassVar[str] = ""
    #: True when clients must all train the same rank (e.g. plain FedAvg on A and B).
    requires_equal_ranks: ClassVar[bool] = False
    #: "continue": the client loads its payload into its trainable LoRA and keeps training.
    #: "residual": the client applies the payload frozen (on top of the base weights) and
    #: trains a fresh LoRA of its own rank, sending back only that fresh LoRA.
    client_mode: ClassVar[ClientMode] = "continue"
    #: True when clients must keep A at its shared seeded initialisation (train B only).
    freeze_A: ClassVar[bool] = False

    @abstractmethod
    def aggregate(
        self, updates: list[ClientUpdate], previous: GlobalAdapter | None
    ) -> GlobalAdapter:
        """Combine one round's client updates into the next global adapter."""

    def payload_for(
        self, adapter: GlobalAdapter, rank: int, scale: float | None = None
    ) -> dict[str, LoraFactors]:
        """What a client of the given rank downloads (default: the whole adapter).

        With ``scale`` (the client's alpha / r) the factors are re-expressed so that
        ``scale * B @ A`` is unchanged and can be loaded into the client's LoRA as is.
        """
        return with_scale(adapter.factors, scale)

    def validate_ranks(self, ranks: Sequence[int]) -> None:
        """Reject a rank configuration this aggregator cannot serve (before round 1)."""
        bad = [r for r in ranks if r < 1]
        if bad:
            raise AggregationError(f"LoRA ranks must be positive, got {sorted(set(bad))}")
        if self.requires_equal_ranks and len(set(ranks)) > 1:
            raise AggregationError(
                f"{self.name} needs every client to train the same rank, got "
                f"{sorted(set(ranks))}; use flora, zeropad, hetlora or flexlora for mixed ranks"
            )

    def metrics(self) -> dict[str, float]:
        """Numbers about the last aggregate (e.g. truncation error) for the round's log."""
        return {}


def example_weights(updates: list[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum(n) over the clients that replied this round."""
    if not updates:
        raise AggregationError("no client updates to aggregate")
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def common_modules(updates: list[ClientUpdate]) -> list[str]:
    """Module names, checked to be the same set in every update."""
    first = set(updates[0].factors)
    for u in updates[1:]:
        if set(u.factors) != first:
            diff = sorted(set(u.factors) ^ first)[:5]
            raise AggregationError(
                f"client {u.client_id or '?'} sent a different set of modules (differs in {diff})"
            )
    return sorted(first)


def next_round(previous: GlobalAdapter | None) -> int:
    return 1 if previous is None else previous.round + 1


def module_parts(updates: list[ClientUpdate], module: str) -> list[LoraFactors]:
    """Every client's factors for one module, checked to share (out, in)."""
    parts = [u.factors[module] for u in updates]
    shapes = {(p.out_features, p.in_features) for p in parts}
    if len(shapes) != 1:
        raise AggregationError(
            f"module {module!r} has different (out, in) shapes: {sorted(shapes)}"
        )
    return parts


def rescaled(factors: LoraFactors, scale: float) -> LoraFactors:
    """Same effective delta ``scale * B @ A`` expressed with a different scale (B absorbs it)."""
    if scale == factors.scale:
        return factors
    if scale == 0:
        raise ValueError("cannot express a LoRA delta with scale 0")
    return LoraFactors(A=factors.A, B=factors.B * (factors.scale / scale), scale=scale)


def with_scale(
    factors: Mapping[str, LoraFactors], scale: float | None
) -> dict[str, LoraFactors]:
    """Every module re-expressed with ``scale`` (unchanged when ``scale`` is None)."""
    if scale is None:
        return dict(factors)
    return {name: rescaled(f, scale) for name, f in factors.items()}
