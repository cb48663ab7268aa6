"""FLoRA stacking: exact aggregation, recompression to a budget, accumulation."""

from __future__ import annotations

import pytest
import torch
from lora_reference import dense, exact_average, rel

from fedtune.aggregation import get_aggregator
from fedtune.aggregation.flora import FLoRA
from fedtune.core.adapters import GlobalAdapter


def test_flora_is_exact_for_mixed_ranks_scales_and_weights(updates_factory) -> None:
    updates = updates_factory([2, 8, 4, 16], [10, 300, 55, 7], scales=[2.0, 0.5, 1.0, 0.25])
    adapter = get_aggregator("flora").aggregate(updates, None)
    for module in ("q", "v"):
        assert adapter.factors[module].scale == 1.0
        assert rel(adapter.delta(module), exact_average(updates, module)) < 1e-5
    assert adapter.round == 1


def test_fedavg_has_cross_terms_on_the_same_case(updates_factory) -> None:
    updates = updates_factory([4, 4, 4], [10, 30, 60], scales=[2.0, 2.0, 2.0])
    flora = get_aggregator("flora").aggregate(updates, None)
    fedavg = get_aggregator("fedavg").aggregate(updates, None)
    exact = exact_average(updates, "q")
    assert rel(flora.delta("q"), exact) < 1e-5
    assert rel(fedavg.delta("q"), exact) > 0.3  # the cross terms B_i A_j


def test_recompression_is_exact_when_the_total_rank_fits(updates_factory) -> None:
    updates = updates_factory([4, 8, 4], [1, 2, 3], dtype=torch.float64)
    aggregator = FLoRA(rank_budget=16)
    adapter = aggregator.aggregate(updates, None)
    assert adapter.factors["q"].rank == 16
    assert aggregator.last_truncation_error < 1e-12
    assert rel(adapter.delta("q"), exact_average(updates, "q")) < 1e-12


def test_truncation_error_matches_the_dense_best_approximation(updates_factory) -> None:
    updates = updates_factory([8, 8, 8], [5, 3, 2], dtype=torch.float64)
    aggregator = FLoRA(rank_budget=10)
    adapter = aggregator.aggregate(updates, None)
    errors = {}
    for module in ("q", "v"):
        exact = exact_average(updates, module)
        S = torch.linalg.svdvals(exact)
        best_error = float(S[10:].norm() / S.norm())
        errors[module] = best_error
        assert adapter.factors[module].rank == 10
        assert aggregator.last_truncation_errors[module] == pytest.approx(best_error, rel=1e-9)
        assert rel(adapter.delta(module), exact) == pytest.approx(best_error, rel=1e-9)
    assert aggregator.last_truncation_error == pytest.approx(max(errors.values()), rel=1e-12)
    assert aggregator.metrics()["truncation_error_max"] == aggregator.last_truncation_error


def test_previous_adapter_accumulates(updates_factory) -> None:
    aggregator = FLoRA(rank_budget=64)
    round1 = updates_factory([4, 2], [10, 20], scales=[2.0, 4.0], dtype=torch.float64)
    round2 = updates_factory([8, 2, 4], [5, 5, 1], scales=[1.0, 4.0, 2.0], dtype=torch.float64)
    first = aggregator.aggregate(round1, None)
    second = aggregator.aggregate(round2, first)
    assert second.round == 2
    for module in ("q", "v"):
        expected = exact_average(round1, module) + exact_average(round2, module)
        assert rel(second.delta(module), expected) < 1e-10
        step = first.delta(module) + exact_average(round2, module)
        assert rel(second.delta(module), step) < 1e-10


def test_previous_with_a_scale_and_untouched_modules_carry_over(updates_factory) -> None:
    earlier = updates_factory([3], [1], modules=("q", "k"), dtype=torch.float64)[0]
    previous = GlobalAdapter(
        {m: f.__class__(A=f.A, B=f.B, scale=3.0) for m, f in earlier.factors.items()}, round=4
    )
    updates = updates_factory([2, 5], [1, 1], modules=("q",), dtype=torch.float64)
    adapter = FLoRA().aggregate(updates, previous)
    assert adapter.round == 5
    expected_q = dense(previous.factors["q"]) + exact_average(updates, "q")
    assert rel(adapter.delta("q"), expected_q) < 1e-10
    assert adapter.factors["k"] is previous.factors["k"]


def test_download_is_bounded_by_the_budget(updates_factory) -> None:
    aggregator = FLoRA(rank_budget=12)
    adapter = None
    for _ in range(3):
        adapter = aggregator.aggregate(updates_factory([8, 8, 8], [1, 1, 1]), adapter)
        assert max(f.rank for f in adapter.factors.values()) <= 12


def test_flora_client_behaviour_flags() -> None:
    aggregator = get_aggregator("flora", rank_budget=8)
    assert aggregator.client_mode == "residual"
    assert aggregator.freeze_A is False and aggregator.requires_equal_ranks is False
    aggregator.validate_ranks([2, 4, 16])
    with pytest.raises(ValueError, match="rank_budget"):
        FLoRA(rank_budget=0)
    with pytest.raises(ValueError, match="split"):
        FLoRA(split="middle")  # type: ignore[arg-type]
