"""Zero-padding: hand-computed padded averages and per-rank slices."""

from __future__ import annotations

import torch
from lora_reference import IN, OUT

from fedtune.aggregation import get_aggregator
from fedtune.core.adapters import ClientUpdate


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros(rows, t.shape[1], dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


def test_padded_average_with_example_weights(updates_factory) -> None:
    updates: list[ClientUpdate] = updates_factory([2, 6, 4], [10, 30, 60], scales=[0.5] * 3)
    adapter = get_aggregator("zeropad").aggregate(updates, None)
    p = [0.1, 0.3, 0.6]
    for module in ("q", "v"):
        A = sum(w * _padded(u.factors[module].A, 6) for w, u in zip(p, updates, strict=True))
        B = sum(w * _padded(u.factors[module].B.T, 6).T for w, u in zip(p, updates, strict=True))
        got = adapter.factors[module]
        assert got.scale == 0.5 and got.A.shape == (6, IN) and got.B.shape == (OUT, 6)
        torch.testing.assert_close(got.A, A)
        torch.testing.assert_close(got.B, B)


def test_mixed_scales_fold_into_B(updates_factory) -> None:
    updates = updates_factory([2, 4], [1, 3], scales=[8.0, 4.0])
    got = get_aggregator("zeropad").aggregate(updates, None).factors["q"]
    B = 0.25 * 8.0 * _padded(updates[0].factors["q"].B.T, 4).T + 0.75 * 4.0 * updates[1].factors[
        "q"
    ].B
    assert got.scale == 1.0
    torch.testing.assert_close(got.B, B)


def test_client_downloads_its_rank_slice(updates_factory) -> None:
    aggregator = get_aggregator("zeropad")
    adapter = aggregator.aggregate(updates_factory([2, 6], [1, 1], scales=[2.0, 2.0]), None)
    payload = aggregator.payload_for(adapter, 2)
    full = adapter.factors["q"]
    assert torch.equal(payload["q"].A, full.A[:2]) and torch.equal(payload["q"].B, full.B[:, :2])
    rescaled = aggregator.payload_for(adapter, 2, scale=4.0)["q"]
    torch.testing.assert_close(rescaled.scale * rescaled.B, 2.0 * full.B[:, :2])
    assert aggregator.client_mode == "continue" and not aggregator.requires_equal_ranks
