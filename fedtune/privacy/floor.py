"""A client's own privacy floor: the weakest client-level DP it agrees to train under.

The server decides the mechanism (clip C, noise multiplier z, epsilon) and tells each
client; a client that only trusted the server would have to take whatever it is told.
A floor is the client's own limit, set where the data lives (``fedtune client
--min-noise-multiplier``, the SDK's ``Client(..., privacy_floor=...)``, a device profile's
keys): a request weaker than the floor is refused before any training, and the refusal
names the setting and both values. It checks what the server *declares*; in central
mode the client cannot see the noise being added (that is the central threat model),
in distributed mode the client adds its own share and holds that share to the floor.

Pure numbers: no Flower, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedtune.privacy.accountant import epsilon_after

DP_MODES = ("central", "distributed")
#: how a deployed client's node config carries its floor (``fedtune client``, the SDK)
NODE_CONFIG_KEYS = {"min-noise-multiplier": "min_noise_multiplier",
                    "max-clip-norm": "max_clip_norm", "max-epsilon": "max_epsilon"}


class PrivacyFloorError(ValueError):
    """A floor setting is not a valid number (the message names it)."""


@dataclass(frozen=True)
class PrivacyFloor:
    """The weakest client-level DP a client accepts; 0 leaves a setting unbounded.

    ``min_noise_multiplier``: the server's z must be at least this, and in distributed
    mode so must the noise the server can see on this client's own share (its std / C,
    times sqrt(min_clients) only under secure aggregation, where the server sees sums of
    at least min_clients shares). ``max_clip_norm``: C at most this (a larger C lets one
    update move the model further for the same noise). ``max_epsilon``: the run's
    declared epsilon at most this."""

    min_noise_multiplier: float = 0.0
    max_clip_norm: float = 0.0
    max_epsilon: float = 0.0

    def __post_init__(self) -> None:
        for name in ("min_noise_multiplier", "max_clip_norm", "max_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise PrivacyFloorError(f"privacy floor {name} = {value!r} is not allowed; "
                                        "expected a finite number >= 0 (0 = no bound)")

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> PrivacyFloor:
        return cls(**{field: float(config[key]) for key, field in NODE_CONFIG_KEYS.items()
                      if key in config})

    def node_config(self) -> dict[str, float]:
        """The floor as node config entries (only the bounds that are set)."""
        return {key: float(getattr(self, field)) for key, field in NODE_CONFIG_KEYS.items()
                if getattr(self, field)}

    @property
    def is_set(self) -> bool:
        return bool(self.min_noise_multiplier or self.max_clip_norm or self.max_epsilon)

    def strictest(self, other: PrivacyFloor) -> PrivacyFloor:
        """Both floors at once (a client's command-line floor and its profile's)."""
        def low(a: float, b: float) -> float:  # the smaller bound, 0 meaning none
            return min(x for x in (a, b) if x) if (a or b) else 0.0
        return PrivacyFloor(max(self.min_noise_multiplier, other.min_noise_multiplier),
                            low(self.max_clip_norm, other.max_clip_norm),
                            low(self.max_epsilon, other.max_epsilon))


@dataclass(frozen=True)
class DPRequest:
    """The client-level DP a server's train message declares (``mode`` "none" when it
    declares none). ``share_std``: distributed mode, the std of the client's own share."""

    mode: str = "none"
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    epsilon: float = math.inf
    share_std: float = 0.0
    min_clients: int = 1
    secure_aggregation: bool = False
    reproducible: bool = False

    def share_multiplier(self) -> float:
        """The noise the server can see on this client's own update, in units of C."""
        if self.clip_norm <= 0:
            return 0.0
        seen_together = self.min_clients if self.secure_aggregation else 1
        return self.share_std * math.sqrt(seen_together) / self.clip_norm


def refusal(floor: PrivacyFloor, request: DPRequest) -> str | None:
    """Why a client with ``floor`` refuses ``request`` (None: it trains)."""
    if not floor.is_set:
        return None
    if request.mode not in DP_MODES:
        return "the round has no client-level DP"
    if request.reproducible:
        return ("the run is a reproducible experiment: its noise is drawn from the run's "
                "seed, which the server knows")
    checks = [
        (floor.min_noise_multiplier, request.noise_multiplier, "noise multiplier", False),
        (floor.max_clip_norm, request.clip_norm, "clip norm", True),
        (floor.max_epsilon, request.epsilon, "epsilon", True),
    ]
    if request.mode == "distributed":
        checks.append((floor.min_noise_multiplier, request.share_multiplier(),
                       "noise multiplier of this client's own share (std / clip norm"
                       + (", over min_clients shares" if request.secure_aggregation else "")
                       + ")", False))
    for bound, value, what, is_max in checks:
        if not bound:
            continue
        if not math.isfinite(value) or (value > bound if is_max else value < bound):
            side = "above the floor's maximum" if is_max else "below the floor"
            return f"{what} {value:.4g} is {side} {bound:g}"
    return None


def own_epsilon(request: DPRequest, participations: int, delta: float,
                accountant: str = "rdp") -> float:
    """The epsilon this client has spent after training in ``participations`` rounds of
    ``request``'s mechanism, each charged as a whole Gaussian release (no subsampling):
    the bound that holds whatever the server's sampling, which the client cannot see.
    The noise is the declared z (central: the server adds it), or in distributed mode
    what the server can see on this client's own share (``share_multiplier``)."""
    z = (request.share_multiplier() if request.mode == "distributed"
         else request.noise_multiplier)
    return epsilon_after([(z, 1.0, participations)], delta, accountant)


def spent_refusal(floor: PrivacyFloor, request: DPRequest, participations: int,
                  delta: float, accountant: str = "rdp") -> str | None:
    """Why a client with ``floor`` does not train its ``participations``-th round of this
    run: its own epsilon (``own_epsilon``) would pass the floor's maximum (None: it
    trains, or the floor sets no maximum, or the run has no client-level DP)."""
    if not floor.max_epsilon or request.mode not in DP_MODES:
        return None
    spent = own_epsilon(request, participations, delta, accountant)
    if spent <= floor.max_epsilon:
        return None
    return (f"its own epsilon would be {spent:.4g} after {participations} rounds (each "
            f"charged without subsampling), above the floor's maximum {floor.max_epsilon:g}")
