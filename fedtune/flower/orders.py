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

import dataclasses
import functools
import math
from typing import Any

from fedtune.aggregation import get_aggregator
from fedtune.config import Scenario
from fedtune.flower import messages as keys
from fedtune.flower.secagg import SecAggSettings
from fedtune.planning.client_settings import ClientSettings
from fedtune.privacy.wrapper import ClientLevelDPAggregator, DPSettings

#: every train-config key a scenario may order (the round and its seed are the server's)
ORDER_KEYS = (keys.MODE, keys.FREEZE_A, keys.PRUNE_GAMMA, keys.INIT, keys.UPLOAD_DENSITY,
              keys.UPLOAD_VALUES, keys.BLOCK_SIZE, keys.ERROR_FEEDBACK, keys.SELECTION,
              keys.DP_CLIP, keys.DP_NOISE_STD, keys.DP_FIELDS, keys.DPSGD_NOISE,
              keys.DPSGD_CLIP, keys.DPSGD_DELTA, keys.DPSGD_ACCOUNTANT, keys.DP_SECURE)
_UNSAID = object()
#: the keys that are the server's: which round, its seed; and the client's settings
_ROUND_KEYS = (keys.ROUND, keys.SEED)
SETTINGS_PREFIX = "client."


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
    exactly that); the reason names the setting and both values. Besides the orders
    the message may say only which round it is, its seed and the client's settings (a
    ``train.steps`` or ``train.lr`` in it would be ignored: the client trains with its
    scenario's, and says so by refusing)."""
    for key in config.keys():
        if key not in ORDER_KEYS and key not in _ROUND_KEYS and not key.startswith(
                SETTINGS_PREFIX):
            return (f"the message sets {key} = {config[key]!r}, which the run's sealed "
                    "scenario does not order")
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


# ---- the client's own settings ------------------------------------------------------------
#: what a train message's ``client.*`` settings may not differ in from what the client
#: derives itself (the partition is the server's in a deployment: it places clients by
#: name; the rank is checked apart, with the LoRA scale alpha / r)
SETTING_FIELDS = ("profile", "quantization", "batch_size", "seq_len", "speed_factor",
                  "min_noise_multiplier", "max_clip_norm", "max_epsilon")


@functools.lru_cache(maxsize=16)
def _own_candidates(scenario: Scenario, profile_text: str | None
                    ) -> tuple[ClientSettings, ...]:
    """A deployed client's settings as the server may resolve them (partition 0): from
    its declared profile (``profile_text``), that profile at the federation's fixed rank
    (an aggregator that needs one rank), or, when the federation cannot serve the
    profile, the scenario's own values; the scenario's values alone without a profile."""
    import tomllib

    from fedtune.planning.client_settings import _uniform, settings_from_profiles
    from fedtune.planning.profiles import DeviceProfile

    uniform = _uniform(scenario, 0)
    if not profile_text:
        return (uniform,)
    candidates = []
    fields = tomllib.loads(profile_text)
    texts = [fields] + ([{**fields, "rank": scenario.lora.rank}]
                        if fields.get("rank") == "auto" else [])
    for data in texts:
        try:
            profile = DeviceProfile.from_dict(data, origin="this client's profile")
            candidates.append(settings_from_profiles(scenario, [profile])[0])
        except (ValueError, KeyError):  # ProfileError, MemoryBudgetError: the server's too
            continue
    return (*candidates, uniform)


def allowed_settings(scenario: Scenario, partition: int, profile_text: str | None = None,
                     deployed: bool = False) -> tuple[ClientSettings, ...]:
    """The settings a client of ``scenario`` may be sent, the first the likeliest: in a
    simulation exactly those ``client_settings`` gives its partition (the scenario fixes
    the profile mix and its seed); deployed, those its own profile (``profile_text``, the
    text it declared; None: no profile) resolves to, or the scenario's defaults."""
    from fedtune.planning.client_settings import client_settings

    if not deployed:
        return (client_settings(scenario)[partition],)
    return tuple(dataclasses.replace(c, partition=partition)
                 for c in _own_candidates(scenario, profile_text or None))


def _settings_difference(want: ClientSettings, asked: ClientSettings, may_shrink: bool
                         ) -> tuple[str, Any, Any] | None:
    """The first setting in which ``asked`` is not ``want`` (None: none): every field of
    ``SETTING_FIELDS`` exactly, the rank equal (at most ``want``'s when the server may
    shrink it: HetLoRA pruning, one rank across profiles) and the LoRA scale alpha / r
    equal."""
    for name in SETTING_FIELDS:
        if not _same(getattr(want, name), getattr(asked, name)):
            return name, getattr(asked, name), getattr(want, name)
    if not (0 < asked.rank <= want.rank if may_shrink else asked.rank == want.rank):
        return "rank", asked.rank, (f"at most {want.rank}" if may_shrink else want.rank)
    if not _same(want.alpha / want.rank, asked.alpha / asked.rank):
        return "alpha", asked.alpha, want.alpha * asked.rank / want.rank  # at that rank
    return None


def settings_refusal(scenario: Scenario, asked: ClientSettings,
                     allowed: tuple[ClientSettings, ...], deployed: bool = False) -> str | None:
    """Why a train message's client settings are not ones the sealed scenario (and a
    deployed client's own profile) give this client (None: they are): batch size and
    sequence length (under DP-SGD they set the sampling rate, so the epsilon), the
    quantization, the profile and its floor, the LoRA scale. Only the rank is the
    server's to lower (HetLoRA's self-pruning; deployed, one rank across the profiles)."""
    may_shrink = scenario.federation.prune_gamma > 0.0 or (deployed and bool(asked.profile))
    differences = []
    for want in allowed:
        difference = _settings_difference(want, asked, may_shrink)
        if difference is None:
            return None
        differences.append(difference)
    name, got, want = differences[0]
    source = ("the run's sealed scenario and this client's profile order"
              if deployed and asked.profile else "the run's sealed scenario orders")
    return f"the message asks for client.{name} = {got!r}; {source} client.{name} = {want!r}"
