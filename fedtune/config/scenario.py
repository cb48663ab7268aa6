"""A whole scenario: the sections together, the checks across them (sampling, privacy),
TOML loading, ``section.key=value`` overrides and the flat run config Flower carries.

Each section's own ``__post_init__`` checks its values (``fedtune.config.sections``);
this module checks keys and types, so every error names the key, the value and what is
allowed before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

import fedtune.resources as resources
from fedtune.aggregation import available, capabilities_of
from fedtune.config.sections import (
    AttackSpec,
    ClientsSpec,
    CompressionConfig,
    ConfigError,
    DataSpec,
    FederationSpec,
    LoraSpec,
    ModelSpec,
    PrivacyConfig,
    PrivacyPlan,
    ReportSpec,
    RunSpec,
    ServerSpec,
    SimulationSpec,
    TrainConfig,
)
from fedtune.privacy.accountant import (
    BudgetError,
    affordable_releases,
    epsilon_after,
    noise_multiplier_for,
)


@dataclass(frozen=True)
class Scenario:
    run: RunSpec = field(default_factory=RunSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationSpec = field(default_factory=FederationSpec)
    simulation: SimulationSpec = field(default_factory=SimulationSpec)
    clients: ClientsSpec = field(default_factory=ClientsSpec)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    server: ServerSpec = field(default_factory=ServerSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    attack: AttackSpec = field(default_factory=AttackSpec)

    def __post_init__(self) -> None:
        n = self.data.num_clients
        if self.federation.clients_per_round > n:
            raise ConfigError(
                f"federation.clients_per_round = {self.federation.clients_per_round} is larger "
                f"than data.num_clients = {n}; allowed: 0 (all) to {n}"
            )
        if self.federation.eval_clients > n:
            raise ConfigError(
                f"federation.eval_clients = {self.federation.eval_clients} is larger than "
                f"the {n} clients (data.num_clients)")
        if self.federation.min_clients > self.sampled_per_round:
            raise ConfigError(
                f"federation.min_clients = {self.federation.min_clients} exceeds the "
                f"{self.sampled_per_round} clients sampled per round"
            )
        self._check_privacy()
        self._check_attack()

    def _check_attack(self) -> None:
        """Simulated attackers must be clients of this scenario, and an attack on the
        update needs the update itself (an uncompressed upload) and a norm to aim at."""
        a = self.attack
        outside = [c for c in a.clients if int(c) >= self.data.num_clients]
        if outside:
            raise ConfigError(f"attack.clients {outside} are not partitions of the "
                              f"{self.data.num_clients} clients (data.num_clients)")
        if a.on_update and not self.compression.upload().is_identity:
            raise ConfigError(f"attack.kind = {a.kind!r} rewrites the update, which needs "
                              "an uncompressed upload (compression.upload_density = 1, "
                              "upload_values = 'fp32')")
        if a.kind == "noise" and not (a.noise_norm or self.federation.max_update_norm):
            raise ConfigError("attack.kind = 'noise' needs attack.noise_norm > 0 or "
                              "federation.max_update_norm > 0 (the norm of the noise)")

    def _check_secure_aggregation(self) -> None:
        """What the server cannot do when it sees only the sum (fedtune.flower.secagg)."""
        p, fed, up = self.privacy, self.federation, self.compression
        capabilities = capabilities_of(fed.aggregator)
        if not capabilities.additive:
            raise ConfigError(
                f"privacy.secure_aggregation cannot serve aggregator = {fed.aggregator!r}: "
                f"{capabilities.no_secagg_reason}; use {_aggregators_with('additive')}")
        if p.mode == "central":
            raise ConfigError(
                "privacy.secure_aggregation cannot be used with privacy.mode = 'central': "
                "the server cannot clip and noise updates it never sees; use mode = "
                "'distributed' (clients clip and noise before masking)")
        if fed.merge != "mean" or fed.padding != "zeros":
            raise ConfigError(
                "privacy.secure_aggregation needs federation.merge = 'mean' and "
                f"federation.padding = 'zeros' (got {fed.merge!r}, {fed.padding!r}): TIES "
                "and skip-padding need to know which client sent which entry")
        if up.upload_density < 1 or up.upload_values != "fp32" or up.download_values != "fp32":
            raise ConfigError(
                "privacy.secure_aggregation sends every update dense and quantised to "
                "privacy.secagg_bits; set compression.upload_density = 1, upload_values = "
                f"'fp32' and download_values = 'fp32' (got {up.upload_density:g}, "
                f"{up.upload_values!r}, {up.download_values!r})")
        bits_needed = p.secagg_bits + max(1, self.data.num_clients - 1).bit_length()
        if bits_needed > 32:
            raise ConfigError(
                f"privacy.secagg_bits = {p.secagg_bits} is too many for a sum of up to "
                f"{self.data.num_clients} clients mod 2^32; at most "
                f"{32 - max(1, self.data.num_clients - 1).bit_length()}")

    def _check_privacy(self) -> None:
        """Refuse DP configurations that look private but are not, before any work."""
        p, fed = self.privacy, self.federation
        if p.secure_aggregation:
            self._check_secure_aggregation()
        if not p.client_level:
            return
        capabilities = capabilities_of(fed.aggregator)
        form = capabilities.dp_form
        if form is None:
            raise ConfigError(
                f"privacy.mode = {p.mode!r} cannot be used with aggregator = "
                f"{fed.aggregator!r}: {capabilities.no_dp_reason}; use "
                f"{_aggregators_with('dp_form', 'factor')} (ffa is exact and linear)")
        if p.delta * self.data.num_clients >= 1:
            raise ConfigError(
                f"privacy.delta = {p.delta:g} must be below 1 / data.num_clients = "
                f"{1 / self.data.num_clients:g}: a mechanism that publishes one client's "
                "update outright meets (epsilon = 0, delta = 1 / clients)")
        if fed.merge != "mean" or fed.padding != "zeros":
            raise ConfigError(
                "privacy.mode needs federation.merge = 'mean' and federation.padding = "
                f"'zeros' (got {fed.merge!r}, {fed.padding!r}): TIES and skip-padding weigh "
                "entries by which clients sent them, which breaks the fixed sensitivity")
        if p.mode == "distributed" and form == "dense":
            raise ConfigError(
                f"privacy.mode = 'distributed' cannot be used with aggregator = "
                f"{fed.aggregator!r}: its noise belongs on the dense sum of weight updates, "
                "which only the server forms; use mode = 'central', or an aggregator with "
                f"noise on the factors: {_aggregators_with('dp_form', 'factor')}")
        if p.min_clients > self.sampled_per_round:
            raise ConfigError(
                f"privacy.min_clients = {p.min_clients} exceeds the {self.sampled_per_round} "
                "clients sampled per round: no round could be released")
        try:
            plan = self.privacy_plan()
        except BudgetError as err:
            raise ConfigError(f"privacy.target_epsilon: {err}") from None
        if p.on_budget == "refuse" and plan.planned_epsilon > p.budget * (1 + 1e-3):
            rounds = affordable_releases(p.budget, plan.noise_multiplier, plan.sample_rate,
                                         p.delta, self.run.rounds, p.accountant)
            raise ConfigError(
                f"privacy: {self.run.rounds} rounds at noise_multiplier "
                f"{plan.noise_multiplier:g} spend epsilon {plan.planned_epsilon:.3g} > "
                f"max_epsilon {p.budget:g}; {rounds} rounds fit the budget (set "
                "run.rounds, raise the noise, or on_budget = 'stop')")

    def privacy_plan(self) -> PrivacyPlan:
        """z (given, or from target_epsilon for the planned rounds) and its epsilon."""
        p = self.privacy
        rate = self.sampled_per_round / self.data.num_clients
        z = p.noise_multiplier or noise_multiplier_for(
            p.target_epsilon, p.delta, rate, self.run.rounds, p.accountant)
        planned = epsilon_after([(z, rate, self.run.rounds)], p.delta, p.accountant)
        return PrivacyPlan(z, rate, self.run.rounds, planned)

    @property
    def sampled_per_round(self) -> int:
        return self.federation.clients_per_round or self.data.num_clients

    # ---- conversions -------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            f.name: {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
            for f in dataclasses.fields(self)
        }

    def to_flat(self) -> dict[str, Any]:
        """Flat ``section.key`` mapping of scalars (lists joined by commas) for Flower."""
        flat: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                if isinstance(value, list):
                    value = ",".join(value)
                elif isinstance(value, dict):
                    value = ",".join(f"{k}={v}" for k, v in value.items())
                flat[f"{section}.{key}"] = value
        return flat

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _aggregators_with(capability: str, value: Any = True) -> str:
    """The registered aggregators whose ``capability`` is ``value``, for advice in errors."""
    names = [n for n in available() if getattr(capabilities_of(n), capability) == value]
    return ", ".join(names) or "none registered"


_SECTION_TYPES = {
    "run": RunSpec, "model": ModelSpec, "lora": LoraSpec, "data": DataSpec,
    "train": TrainConfig, "federation": FederationSpec, "simulation": SimulationSpec,
    "clients": ClientsSpec, "compression": CompressionConfig, "privacy": PrivacyConfig,
    "server": ServerSpec, "report": ReportSpec, "attack": AttackSpec,
}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---- building ---------------------------------------------------------------------
def build_scenario(raw: Mapping[str, Any], origin: str = "scenario") -> Scenario:
    """Validate a nested mapping (parsed TOML) into a :class:`Scenario`."""
    unknown = sorted(set(raw) - set(_SECTION_TYPES))
    if unknown:
        raise ConfigError(
            f"{origin}: unknown section [{unknown[0]}]; allowed sections: "
            f"{', '.join(_SECTION_TYPES)}"
        )
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        values = raw.get(name, {})
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: [{name}] must be a table, got {values!r}")
        sections[name] = _build_section(name, cls, values, origin)
    try:
        return Scenario(**sections)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None


def _build_section(name: str, cls: type, values: Mapping[str, Any], origin: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in fields:
            raise ConfigError(
                f"{origin}: unknown key {name}.{raw_key}; allowed keys in [{name}]: "
                f"{', '.join(fields)}"
            )
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key], origin)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{origin}: [{name}] {err}") from None


def _coerce(key: str, value: Any, hint: Any, origin: str) -> Any:
    """Check a value against a field's type, converting where it is lossless."""
    expected = _describe(hint)
    origin_hint = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin_hint in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], origin)
    if origin_hint is dict:
        if isinstance(value, str):  # the flat form "a=0.5,b=0.5"
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if all(len(p) == 2 for p in pairs):
                value = {k.strip(): _number(v) for k, v in pairs}
        if isinstance(value, Mapping) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
        ):
            return {str(k): float(v) for k, v in value.items()}
    elif origin_hint is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(i, str) for i in items):
            return tuple(i.strip() for i in items if i.strip())
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{origin}: {key} = {value!r} has the wrong type; expected {expected}")


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is dict:
        return "a table of name = proportion"
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "none"}.get(hint, str(hint))


# ---- loading and overriding ----------------------------------------------------------
def resolve_scenario_path(name: str | Path | None) -> Path:
    """A path, or the name of a bundled scenario (``default``, ``tiny``, ...), or a
    bundled file as the repository names it (``server/server.toml``) where no such file
    is here. A bundled file missing from the installation is a ``ConfigError`` too."""
    try:
        if name is None:
            return resources.default_scenario()
        path = Path(name)
        if path.exists():
            return path
        if path.parent == Path(".") and path.suffix in ("", resources.SUFFIX):
            if path.stem in resources.names("scenario"):  # a bare name, never a missing path
                return resources.path("scenario", path.stem)
        bundled = resources.from_repository_path(path)
        if bundled is not None:
            return bundled
    except resources.BundledFileMissing as err:
        raise ConfigError(str(err)) from None
    choices = ", ".join(resources.names("scenario")) or "(none: reinstall fedtune)"
    raise ConfigError(f"scenario file {str(name)!r} not found; bundled scenarios: {choices}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value parsed as a TOML value or a string)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. run.rounds=2")
    dotted, raw_value = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return section, key, value


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply flat ``section.key`` overrides onto a nested mapping (a copy)."""
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        merged.setdefault(section, {})[key] = value
    return merged


def load_scenario(path: str | Path | None = None, overrides: list[str] | None = None) -> Scenario:
    """Read a scenario TOML file and apply ``section.key=value`` overrides."""
    resolved = resolve_scenario_path(path)
    try:
        raw = tomllib.loads(resolved.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{resolved}: not valid TOML: {err}") from None
    flat = {}
    for text in overrides or []:
        section, key, value = parse_override(text)
        flat[f"{section}.{key}"] = value
    return build_scenario(apply_overrides(raw, flat), origin=str(resolved))


def scenario_from_flat(flat: Mapping[str, Any]) -> Scenario:
    """Rebuild a scenario from a Flower run config.

    ``scenario`` (a file) is read first when present; every ``section.key`` entry
    then overrides it, and so does each whitespace-separated ``section.key=value`` in
    ``overrides``. ``flwr run`` only accepts run-config keys that pyproject.toml declares,
    so there it is ``--run-config 'overrides="run.rounds=2 train.steps=4"'``.
    """
    base: dict[str, Any] = {}
    if flat.get("scenario"):
        base = tomllib.loads(resolve_scenario_path(str(flat["scenario"])).read_text())
    dotted = {k: v for k, v in flat.items() if "." in k}
    for text in str(flat.get("overrides") or "").split():
        section, key, value = parse_override(text)
        dotted[f"{section}.{key}"] = value
    return build_scenario(apply_overrides(base, dotted), origin="run config")
