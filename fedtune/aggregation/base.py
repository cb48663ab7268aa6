"""The aggregator contract shared by every method.

An aggregator is a pure function of the replies of one round (and the previous
global adapter): randomness only through an explicit generator, no I/O, no Flower.
Each aggregator class owns its facts: ``capabilities`` (what it can serve: mixed
ranks, secure aggregation, DP, merging, padding, how clients use their download) and
``Options`` (the ``federation.<key>`` scenario keys it reads, validated there), so
config, strategy, DP and compare ask the class instead of keeping tables of names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors

ClientMode = Literal["continue", "residual", "latent"]
CLIENT_MODES = ("continue", "residual", "latent")
#: Where client-level DP noise goes (see fedtune.privacy.mechanism): on B with A frozen
#: and shared ("factor"), or on the dense sum of weight updates ("dense").
DP_FORMS = ("factor", "dense")


class AggregationError(ValueError):
    """The updates of a round cannot be combined by this aggregator."""


@dataclass(frozen=True)
class Capabilities:
    """What an aggregator can serve; read by config, strategy, DP and compare."""

    #: clients may train different ranks
    mixed_ranks: bool = False
    #: the aggregate is a weighted sum of client updates, entry by entry (what secure
    #: aggregation could serve)
    additive: bool = False
    #: takes federation.merge ("mean" or "ties") and ties_density
    merges: bool = False
    #: takes federation.padding ("zeros" or "skip")
    pads: bool = False
    #: takes HetLoRA's federation.prune_gamma (clients self-prune their rank)
    prunes: bool = False
    #: client-level DP form: "factor", "dense", or None (its weights depend on the
    #: updates, so one client's influence is not bounded by the clip norm)
    dp_form: str | None = None
    #: why client-level DP is refused when there is no DP form (the error says so)
    no_dp_reason: str = ("its weights depend on the updates themselves, so one client's "
                         "influence is not bounded by the clip norm")
    #: why secure aggregation is refused when the aggregator is not additive
    no_secagg_reason: str = ("stacking and SVD-based aggregators need each client's own "
                             "factors, so the server sees every update")
    #: "continue": the client loads its payload into its trainable LoRA and keeps training.
    #: "residual": the client applies the payload frozen (on top of the base weights) and
    #: trains a fresh LoRA of its own rank, sending back only that fresh LoRA.
    #: "latent": as "continue", but only an r x r matrix R per module trains (B = B_start
    #: + B_0 R with B_0 fixed and seeded, A frozen) and only R is sent back (fedsb).
    client_mode: str = "continue"
    #: clients keep A at its shared seeded initialisation (train B only)
    freeze_A: bool = False

    def __post_init__(self) -> None:
        require(self.dp_form is None or self.dp_form in DP_FORMS, "dp_form", self.dp_form,
                f"None or one of {', '.join(DP_FORMS)}")
        require(self.client_mode in CLIENT_MODES, "client_mode", self.client_mode,
                f"one of {', '.join(CLIENT_MODES)}")


@dataclass(frozen=True)
class NoOptions:
    """The options of an aggregator that reads no ``federation`` key."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """The one form of an option error: it names the key, the value and what is allowed."""
    if not ok:
        raise ValueError(f"{key} = {value!r} is not allowed; expected {allowed}")


def option_names(options_class: type) -> tuple[str, ...]:
    """The ``federation`` keys an Options dataclass reads (its field names)."""
    return tuple(f.name for f in fields(options_class))


class Aggregator(ABC):
    """Base class: subclasses declare ``name``, ``capabilities`` and ``Options`` and
    implement :meth:`aggregate`. Options can be given as an ``Options`` instance or as
    keywords (``ZeroPad(padding="skip")``); either way they are validated by ``Options``."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: frozen dataclass whose field names are the ``federation.<key>`` keys this reads
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None, /, **values: Any) -> None:
        if options is None:
            options = self.Options(**values)
        elif values or not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} takes one {self.Options.__name__} or "
                            f"keyword options, got {options!r} and {sorted(values)}")
        self.options = options

    # what the client side reads (kept as attributes: new code uses ``capabilities``)
    @property
    def requires_equal_ranks(self) -> bool:
        """True when clients must all train the same rank (e.g. plain FedAvg on A and B)."""
        return not self.capabilities.mixed_ranks

    @property
    def client_mode(self) -> ClientMode:
        return self.capabilities.client_mode  # type: ignore[return-value]

    @property
    def freeze_A(self) -> bool:
        return self.capabilities.freeze_A

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

    def dp_release_rank(self, ranks: Sequence[int]) -> int:
        """The rank a dense DP release is truncated to: the largest client rank (an
        aggregator that keeps a rank budget of its own says so)."""
        return max(ranks)

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
