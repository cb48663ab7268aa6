"""Aggregation methods: pure functions over core types, one per file."""

from fedtune.aggregation.base import AggregationError, Aggregator
from fedtune.aggregation.hetlora import self_prune_rank
from fedtune.aggregation.registry import available, get_aggregator, register

__all__ = [
    "AggregationError",
    "Aggregator",
    "available",
    "get_aggregator",
    "register",
    "self_prune_rank",
]
