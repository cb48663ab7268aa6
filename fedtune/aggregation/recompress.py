"""Shared by the SVD-based aggregators (flora, flexlora): stack weighted factors, keep the
best low-rank part, and report how much was cut."""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.aggregation.base import AggregationError
from fedtune.core.adapters import LoraFactors
from fedtune.core.lowrank import Split, stack, truncate


def stack_and_truncate(members: Sequence[LoraFactors], weights: Sequence[float], rank: int,
                       split: Split) -> tuple[LoraFactors, float]:
    """Best rank-``rank`` factors (scale 1) of sum_k w_k s_k B_k A_k, and the relative
    Frobenius error of that truncation; never forms the dense matrix."""
    try:
        B, A = stack(members, weights)
    except ValueError as err:
        raise AggregationError(str(err)) from None
    result = truncate(B, A, rank, split=split)
    return LoraFactors(A=result.A, B=result.B, scale=1.0), result.relative_error


class TruncationReport:
    """Per-module truncation errors of the last aggregate, exposed as round metrics."""

    last_truncation_errors: dict[str, float]

    @property
    def last_truncation_error(self) -> float:
        """Worst relative truncation error over the modules of the last aggregate."""
        return max(self.last_truncation_errors.values(), default=0.0)

    def metrics(self) -> dict[str, float]:
        errors = list(self.last_truncation_errors.values())
        if not errors:
            return {}
        return {"truncation_error_max": max(errors),
                "truncation_error_mean": sum(errors) / len(errors)}
