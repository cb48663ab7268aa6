"""Aggregation methods: pure functions over core types, one per file, each registering
itself with its capabilities and options (see ``registry``)."""

import importlib as _importlib
import pkgutil as _pkgutil

from fedtune.aggregation.base import AggregationError, Aggregator, Capabilities, NoOptions
from fedtune.aggregation.hetlora import self_prune_rank
from fedtune.aggregation.registry import (
    aggregator_class,
    available,
    capabilities_of,
    get_aggregator,
    options_for,
    register,
    unregister,
)

# Every file of the package, so each aggregator's ``@register`` runs: no list to edit.
for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AggregationError",
    "Aggregator",
    "Capabilities",
    "NoOptions",
    "aggregator_class",
    "available",
    "capabilities_of",
    "get_aggregator",
    "options_for",
    "register",
    "self_prune_rank",
    "unregister",
]
