"""FlexLoRA: exact average, SVD redistribution to each client's rank."""

from __future__ import annotations

import pytest
import torch
from lora_reference import exact_average, rel

from fedtune.aggregation import get_aggregator
from fedtune.aggregation.flexlora import FlexLoRA


@pytest.mark.parametrize("client_rank", [1, 3, 8])
def test_client_factors_are_the_best_rank_r_approximation(updates_factory, client_rank) -> None:
    updates = updates_factory([2, 8, 4], [30, 10, 60], scales=[8.0, 2.0, 4.0],
                              dtype=torch.float64)
    aggregator = get_aggregator("flexlora")
    adapter = aggregator.aggregate(updates, None)
    client_scale = 16.0 / client_rank  # peft: alpha / r
    payload = aggregator.payload_for(adapter, client_rank, scale=client_scale)
    for module in ("q", "v"):
        W = exact_average(updates, module)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        factors = payload[module]
        assert factors.rank == client_rank and factors.scale == client_scale
        got = factors.scale * factors.B @ factors.A
        best = U[:, :client_rank] @ torch.diag(S[:client_rank]) @ Vh[:client_rank]
        torch.testing.assert_close(got, best, rtol=1e-9, atol=1e-9)
        assert float((W - got).norm()) == pytest.approx(float(S[client_rank:].norm()), rel=1e-9)


def test_global_keeps_the_largest_client_rank(updates_factory) -> None:
    updates = updates_factory([2, 8, 4], [1, 1, 1], dtype=torch.float64)
    aggregator = FlexLoRA()
    adapter = aggregator.aggregate(updates, None)
    assert {f.rank for f in adapter.factors.values()} == {8}
    W = exact_average(updates, "q")
    S = torch.linalg.svdvals(W)
    assert aggregator.last_truncation_errors["q"] == pytest.approx(
        float(S[8:].norm() / S.norm()), rel=1e-9
    )
    assert rel(adapter.delta("q"), W) == pytest.approx(aggregator.last_truncation_errors["q"],
                                                       rel=1e-9)


def test_max_rank_option_keeps_the_exact_average(updates_factory) -> None:
    updates = updates_factory([2, 8, 4], [3, 1, 2])
    adapter = FlexLoRA(max_rank=14).aggregate(updates, None)
    assert adapter.factors["v"].rank == 14
    assert rel(adapter.delta("v"), exact_average(updates, "v")) < 1e-5
    assert adapter.factors["v"].A.dtype == torch.float32


def test_payload_without_scale_has_scale_one(updates_factory) -> None:
    aggregator = FlexLoRA()
    adapter = aggregator.aggregate(updates_factory([4, 4], [1, 1]), None)
    payload = aggregator.payload_for(adapter, 2)
    assert all(f.scale == 1.0 and f.rank == 2 for f in payload.values())
    assert aggregator.client_mode == "continue" and not aggregator.requires_equal_ranks
