"""Aggregation methods: pure functions over core types, one per file, each registering
itself with its capabilities and options (see ``registry``)."""

from fedtune.aggregation.base import AggregationError, Aggregator, Capabilities, NoOptions
from fedtune.aggregation.hetlora import self_prune_rank
from fedtune.aggregation.registry import (
    aggregator_class,
    available,
    capabilities_of,
    get_aggregator,
    options_for,
    register,
)

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
]
