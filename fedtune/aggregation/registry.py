"""Name -> aggregator class; ``get_aggregator`` is the one entry point."""

from __future__ import annotations

from typing import Any

from fedtune.aggregation.base import Aggregator
from fedtune.aggregation.fedavg import FedAvg
from fedtune.aggregation.ffa import FFA
from fedtune.aggregation.flexlora import FlexLoRA
from fedtune.aggregation.flora import FLoRA
from fedtune.aggregation.hetlora import HetLoRA
from fedtune.aggregation.zeropad import ZeroPad

_REGISTRY: dict[str, type[Aggregator]] = {}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator / call that makes an aggregator available by its name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_aggregator(name: str, **options: Any) -> Aggregator:
    """Build the aggregator registered under ``name`` with its options."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregator {name!r}; available: {', '.join(available())}"
        ) from None
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"bad options for aggregator {name!r}: {err}") from None


for _cls in (FedAvg, ZeroPad, HetLoRA, FLoRA, FlexLoRA, FFA):
    register(_cls)
