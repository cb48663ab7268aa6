"""FFA-LoRA: shared frozen A, B averaged exactly, differing A rejected."""

from __future__ import annotations

import pytest
import torch
from lora_reference import exact_average, rel

from fedtune.aggregation import AggregationError, get_aggregator
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors


def _shared_A_updates(gen: torch.Generator, scales: list[float], examples: list[int],
                      rank: int = 4) -> list[ClientUpdate]:
    A = torch.randn(rank, 40, generator=gen)
    return [
        ClientUpdate(
            factors={"q": LoraFactors(A=A.clone(), B=torch.randn(48, rank, generator=gen),
                                      scale=s)},
            num_examples=n,
        )
        for s, n in zip(scales, examples, strict=True)
    ]


def test_ffa_is_exact(gen) -> None:
    updates = _shared_A_updates(gen, [2.0, 2.0, 2.0], [10, 20, 70])
    adapter = get_aggregator("ffa").aggregate(updates, None)
    assert rel(adapter.delta("q"), exact_average(updates, "q")) < 1e-6
    assert adapter.factors["q"].scale == 2.0
    assert torch.equal(adapter.factors["q"].A, updates[0].factors["q"].A)


def test_ffa_is_exact_with_mixed_scales(gen) -> None:
    updates = _shared_A_updates(gen, [1.0, 4.0], [3, 1])
    adapter = get_aggregator("ffa").aggregate(updates, None)
    assert rel(adapter.delta("q"), exact_average(updates, "q")) < 1e-6


def test_ffa_rejects_differing_A(gen) -> None:
    updates = _shared_A_updates(gen, [1.0, 1.0], [1, 1])
    bad = updates[1].factors["q"]
    updates[1] = ClientUpdate(
        factors={"q": LoraFactors(A=bad.A + 1e-2, B=bad.B)}, num_examples=1, client_id="bob"
    )
    with pytest.raises(AggregationError, match="bob"):
        get_aggregator("ffa").aggregate(updates, None)


def test_ffa_rejects_A_that_drifted_from_previous(gen) -> None:
    updates = _shared_A_updates(gen, [1.0, 1.0], [1, 1])
    first = get_aggregator("ffa").aggregate(updates, None)
    moved = GlobalAdapter(
        {"q": LoraFactors(A=first.factors["q"].A * 1.1, B=first.factors["q"].B)}, round=1
    )
    with pytest.raises(AggregationError, match="previous"):
        get_aggregator("ffa").aggregate(updates, moved)
    assert get_aggregator("ffa").aggregate(updates, first).round == 2


def test_ffa_tolerates_rounding_noise_and_flags_mixed_ranks(gen) -> None:
    updates = _shared_A_updates(gen, [1.0, 1.0], [1, 1])
    noisy = updates[1].factors["q"]
    updates[1] = ClientUpdate(
        factors={"q": LoraFactors(A=noisy.A + 1e-8, B=noisy.B)}, num_examples=1
    )
    get_aggregator("ffa").aggregate(updates, None)
    aggregator = get_aggregator("ffa")
    assert aggregator.freeze_A is True and aggregator.requires_equal_ranks is True
    with pytest.raises(AggregationError, match="same rank"):
        aggregator.validate_ranks([4, 8])
