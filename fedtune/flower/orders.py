"""What a run's scenario orders every client to apply, derived in one place.

The server writes these settings into every train message (``FedtuneStrategy``'s train
config is ``scenario_orders`` plus the round and its seed); a client derives them again
from the scenario it holds (in a deployment the run config the server sealed) and applies
its own derivation, never the message's. A message that asks for anything else (other
DP fields, A frozen or not, another DP-SGD z, C, delta or accountant, another noise
share, other upload values or density) is refused with the setting named
(``order_refusal``): the sealed scenario is the client's only authority, and the message
only says which round it is.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from fedtune.aggregation import get_aggregator
from fedtune.config import Scenario
from fedtune.flower import messages as keys
from fedtune.flower.secagg import SecAggSettings
from fedtune.privacy.wrapper import ClientLevelDPAggregator, DPSettings

#: every train-config key a scenario may order (the round and its seed are the server's)
ORDER_KEYS = (keys.MODE, keys.FREEZE_A, keys.PRUNE_GAMMA, keys.INIT, keys.UPLOAD_DENSITY,
              keys.UPLOAD_VALUES, keys.BLOCK_SIZE, keys.ERROR_FEEDBACK, keys.SELECTION,
              keys.DP_CLIP, keys.DP_NOISE_STD, keys.DP_FIELDS, keys.DPSGD_NOISE,
              keys.DPSGD_CLIP, keys.DPSGD_DELTA, keys.DPSGD_ACCOUNTANT, keys.DP_SECURE)
_UNSAID = object()


def scenario_orders(scenario: Scenario) -> dict[str, Any]:
    """The train config every client of every round gets from ``scenario``: how it
    trains (the aggregator's mode, A frozen or not), how its update travels, its
    distributed-DP clip, noise share and fields, its DP-SGD mechanism."""
    return dict(_orders(scenario))


@functools.lru_cache(maxsize=8)
def _orders(scenario: Scenario) -> tuple[tuple[str, Any], ...]:
    fed, compression, p = scenario.federation, scenario.compression, scenario.privacy
    aggregator = get_aggregator(fed.aggregator, **fed.aggregator_options())
    capabilities, up = aggregator.capabilities, compression.upload()
    orders: dict[str, Any] = {
        keys.MODE: capabilities.client_mode, keys.FREEZE_A: capabilities.freeze_A,
        keys.PRUNE_GAMMA: fed.prune_gamma, keys.INIT: fed.flora_init,
        keys.UPLOAD_DENSITY: up.density, keys.UPLOAD_VALUES: up.values,
        keys.BLOCK_SIZE: up.block_size, keys.ERROR_FEEDBACK: compression.error_feedback,
        keys.SELECTION: compression.selection}
    if p.client_level and p.mode == "distributed":
        settings = DPSettings.planned(p, scenario.privacy_plan())
        released = ClientLevelDPAggregator(aggregator, settings, scenario.run.seed).trainable
        orders.update({keys.DP_CLIP: p.clip_norm, keys.DP_NOISE_STD: settings.client_noise_std,
                       keys.DP_FIELDS: ",".join(released)})
    if p.sample_level:
        orders.update({keys.DPSGD_NOISE: p.sample_noise_multiplier,
                       keys.DPSGD_CLIP: p.sample_clip_norm, keys.DPSGD_DELTA: p.delta,
                       keys.DPSGD_ACCOUNTANT: p.accountant})
    if p.client_level or p.sample_level:
        orders[keys.DP_SECURE] = p.os_entropy
    return tuple(orders.items())


def _same(ordered: Any, asked: Any) -> bool:
    """One setting as ordered and as asked: flags and names exactly, numbers to rounding."""
    if isinstance(ordered, bool) or isinstance(asked, bool) or isinstance(ordered, str):
        return type(ordered) is type(asked) and ordered == asked
    if not isinstance(asked, (int, float)):
        return False
    return math.isclose(float(ordered), float(asked), rel_tol=1e-9, abs_tol=1e-12)


def order_refusal(orders: dict[str, Any], config: Any) -> str | None:
    """Why a train message's ``config`` is not what the scenario ``orders`` (None: it is
    exactly that); the reason names the setting and both values."""
    for key in ORDER_KEYS:
        ordered, asked = orders.get(key, _UNSAID), config.get(key, _UNSAID)
        if ordered is _UNSAID and asked is _UNSAID:
            continue
        if ordered is _UNSAID:
            return (f"the message sets {key} = {asked!r}, which the run's sealed scenario "
                    "does not order")
        if asked is _UNSAID:
            return (f"the message does not set {key}; the run's sealed scenario orders "
                    f"{key} = {ordered!r}")
        if not _same(ordered, asked):
            return (f"the message asks for {key} = {asked!r}; the run's sealed scenario "
                    f"orders {key} = {ordered!r}")
    return None


def secagg_refusal(scenario: Scenario, record: Any) -> str | None:
    """Why a train message's secure-aggregation record asks for other than the scenario
    orders (None: it does not): the clip norm and noise share the vector is held to (a
    share of 0 would have the client clip its noised update, scaling its noise down to
    C), the bits, and under distributed DP the factors the mechanism releases. The
    threshold and the neighbourhood are ``secagg``'s to check."""
    try:
        asked = SecAggSettings.from_config(record)
    except (KeyError, TypeError, ValueError) as err:
        return f"its secure aggregation record is malformed ({err!r})"
    orders, p = scenario_orders(scenario), scenario.privacy
    ordered: dict[str, Any] = {"clip-norm": (asked.clip_norm, p.clip_norm),
                               "noise-std": (asked.noise_std,
                                             float(orders.get(keys.DP_NOISE_STD, 0.0))),
                               "bits": (asked.bits, p.secagg_bits)}
    if keys.DP_FIELDS in orders:
        ordered["fields"] = (",".join(asked.fields), orders[keys.DP_FIELDS])
    for name, (got, want) in ordered.items():
        if not _same(want, got):
            return (f"its secure aggregation asks for {name} = {got!r}; the run's sealed "
                    f"scenario orders {name} = {want!r}")
    return None
