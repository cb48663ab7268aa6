"""What each client trains with: rank, alpha, quantization, batch size, sequence length.

Without device profiles every client uses the scenario's ``[lora]``, ``[model]`` and
``[train]`` values. With profiles (``[clients]``), each client's settings come from its
profile, resolved against the model's dimensions by the memory estimator. The server is
authoritative: it computes these settings and sends them to each node with every
message, and checks that replies match them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from fedtune.aggregation import AggregationError, capabilities_of, get_aggregator
from fedtune.config import ConfigError, LoraSpec, ModelSpec, Scenario, TrainConfig
from fedtune.privacy.floor import PrivacyFloor

if TYPE_CHECKING:
    from fedtune.planning.profiles import DeviceProfile


@dataclass(frozen=True)
class ClientSettings:
    """The settings one client trains with in this federation."""

    partition: int
    profile: str
    rank: int
    alpha: float
    quantization: str
    batch_size: int
    seq_len: int
    speed_factor: float = 1.0
    #: simulation: the privacy floor of the client's profile (a deployed client holds
    #: the server to its own profile file and command line, not to these)
    min_noise_multiplier: float = 0.0
    max_clip_norm: float = 0.0
    max_epsilon: float = 0.0

    @property
    def privacy_floor(self) -> PrivacyFloor:
        return PrivacyFloor(self.min_noise_multiplier, self.max_clip_norm, self.max_epsilon)

    def lora_spec(self, base: LoraSpec) -> LoraSpec:
        return replace(base, rank=self.rank, alpha=self.alpha)

    def model_spec(self, base: ModelSpec) -> ModelSpec:
        return replace(base, quantization=self.quantization)

    def train_config(self, base: TrainConfig) -> TrainConfig:
        return replace(base, batch_size=self.batch_size)

    def to_config(self) -> dict[str, Any]:
        """As ConfigRecord entries (prefixed so they never clash with other keys)."""
        return {f"client.{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClientSettings:
        values = {k.removeprefix("client."): v for k, v in config.items()
                  if k.startswith("client.")}
        try:
            return cls(**values)
        except TypeError as err:
            raise ValueError(f"message carries incomplete client settings: {err}") from None


def _uniform(scenario: Scenario, partition: int) -> ClientSettings:
    return ClientSettings(
        partition=partition, profile="", rank=scenario.lora.rank, alpha=scenario.lora.alpha,
        quantization=scenario.model.quantization, batch_size=scenario.train.batch_size,
        seq_len=scenario.data.seq_len,
    )


def _from_profiles(scenario: Scenario) -> list[ClientSettings]:
    from fedtune.planning.profiles import assign_profiles, load_profile

    spec = scenario.clients
    names = assign_profiles(scenario.data.num_clients, spec.mix or list(spec.profiles),
                            scenario.run.seed)
    loaded = {name: load_profile(name) for name in sorted(set(names))}
    return settings_from_profiles(scenario, [loaded[name] for name in names])


def settings_from_profiles(scenario: Scenario, profiles: Sequence[DeviceProfile | None]
                           ) -> list[ClientSettings]:
    """One client per entry (index = partition): its profile resolved against the model,
    or the scenario's own values where the entry is None (a client without a profile)."""
    from fedtune.model.memory import model_dims
    from fedtune.planning.profiles import resolve_profile

    dims = model_dims(scenario.model.source)
    resolved = {
        p.name: resolve_profile(p, dims, scenario.lora.target_modules)
        for p in profiles if p is not None
    }
    rank_of = {name: r.rank for name, r in resolved.items()}
    if rank_of and _equal_ranks(scenario):
        smallest = min(rank_of.values())
        rank_of = dict.fromkeys(rank_of, smallest)
    settings = []
    for i, profile in enumerate(profiles):
        if profile is None:
            settings.append(_uniform(scenario, i))
            continue
        name = profile.name
        settings.append(ClientSettings(
            partition=i, profile=name, rank=rank_of[name],
            alpha=resolved[name].alpha * rank_of[name] / resolved[name].rank,
            quantization=resolved[name].quantization, batch_size=resolved[name].batch_size,
            seq_len=min(resolved[name].seq_len, scenario.data.seq_len),
            speed_factor=resolved[name].speed_factor,
            min_noise_multiplier=profile.min_noise_multiplier,
            max_clip_norm=profile.max_clip_norm, max_epsilon=profile.max_epsilon,
        ))
    return settings


def _equal_ranks(scenario: Scenario) -> bool:
    """Whether the rank policy asks every client to train the smallest profile rank."""
    policy = scenario.clients.rank_policy
    if policy == "auto":
        return not capabilities_of(scenario.federation.aggregator).mixed_ranks
    return policy == "min"


@functools.lru_cache(maxsize=16)
def client_settings(scenario: Scenario) -> tuple[ClientSettings, ...]:
    """Settings of every client (index = partition id), checked against the aggregator."""
    if scenario.clients.enabled:
        try:
            settings = _from_profiles(scenario)
        except ValueError as err:  # ProfileError, MemoryBudgetError
            raise ConfigError(f"[clients] {err}") from None
    else:
        settings = [_uniform(scenario, i) for i in range(scenario.data.num_clients)]
    check_ranks(scenario, [s.rank for s in settings])
    return tuple(settings)


def check_ranks(scenario: Scenario, ranks: list[int]) -> None:
    """Configuration errors for ranks the aggregator cannot serve."""
    aggregator = get_aggregator(scenario.federation.aggregator,
                                **scenario.federation.aggregator_options())
    try:
        aggregator.validate_ranks(ranks)
    except AggregationError as err:
        raise ConfigError(
            f"federation.aggregator = {scenario.federation.aggregator!r} cannot serve the "
            f"client ranks {sorted(set(ranks))}: {err}"
        ) from None


def check_ranks_fit_model(scenario: Scenario, settings: tuple[ClientSettings, ...]) -> None:
    """A rank larger than min(in, out) of a target module is a configuration error."""
    from fedtune.model.memory import model_dims

    dims = model_dims(scenario.model.source)
    limit = dims.max_rank(scenario.lora.target_modules)
    too_big = sorted({s.rank for s in settings if s.rank > limit})
    if too_big:
        raise ConfigError(
            f"LoRA rank {too_big} is larger than the target modules "
            f"{list(scenario.lora.target_modules)} allow (at most {limit}) for "
            f"model {scenario.model.source!r}"
        )
