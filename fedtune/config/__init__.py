"""Scenario files: TOML validated into typed, frozen config objects.

A scenario has one table per section (``[run]``, ``[model]``, ``[lora]``, ``[data]``,
``[train]``, ``[federation]``, ``[simulation]``, ...). Each section is a dataclass in
``sections`` whose ``__post_init__`` checks its values; ``scenario`` checks keys, types
and the rules across sections, loads files and applies ``section.key=value`` overrides
(``--set``); the same keys travel to Flower apps as a flat run config. Importing this
package loads no peft, transformers or flwr.
"""

from typing import Any

from fedtune.aggregation import available, capabilities_of
from fedtune.config.scenario import (
    Scenario,
    apply_overrides,
    build_scenario,
    load_scenario,
    parse_override,
    resolve_scenario_path,
    scenario_from_flat,
)
from fedtune.config.sections import (
    ATTACKS,
    DEVICE_CHOICES,
    DP_MODES,
    DTYPES,
    QUANTIZATIONS,
    SCHEDULES,
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
    aggregator_keys,
    is_valid_device,
    parse_tiny_seed,
)


def __getattr__(name: str) -> Any:
    """``DP_FORMS`` (deprecated: ask ``capabilities_of(name).dp_form``), derived from the
    registry on every access so that aggregators registered later are in it."""
    if name == "DP_FORMS":
        return {n: capabilities_of(n).dp_form for n in available()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ATTACKS",
    "DEVICE_CHOICES",
    "DP_MODES",
    "DTYPES",
    "QUANTIZATIONS",
    "SCHEDULES",
    "AttackSpec",
    "ClientsSpec",
    "CompressionConfig",
    "ConfigError",
    "DataSpec",
    "FederationSpec",
    "LoraSpec",
    "ModelSpec",
    "PrivacyConfig",
    "PrivacyPlan",
    "ReportSpec",
    "RunSpec",
    "Scenario",
    "ServerSpec",
    "SimulationSpec",
    "TrainConfig",
    "aggregator_keys",
    "apply_overrides",
    "build_scenario",
    "is_valid_device",
    "load_scenario",
    "parse_override",
    "parse_tiny_seed",
    "resolve_scenario_path",
    "scenario_from_flat",
]
