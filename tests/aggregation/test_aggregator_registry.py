"""Registry, client-behaviour flags, rank validation and purity of every aggregator."""

from __future__ import annotations

import pytest
import torch

from fedtune.aggregation import AggregationError, available, get_aggregator

NAMES = ["fedavg", "fedsb", "ffa", "flexlora", "flora", "geomedian", "hetlora", "lorafair",
         "multikrum", "zeropad"]


def test_every_method_is_registered() -> None:
    assert available() == NAMES


def test_unknown_name_lists_the_available_methods() -> None:
    with pytest.raises(ValueError) as err:
        get_aggregator("fedprox")
    for name in NAMES:
        assert name in str(err.value)


def test_bad_options_name_the_aggregator() -> None:
    with pytest.raises(ValueError, match="flexlora"):
        get_aggregator("flexlora", rank_budget=3)


@pytest.mark.parametrize(
    ("name", "mode", "freeze", "equal"),
    [
        ("fedavg", "continue", False, True),
        ("zeropad", "continue", False, False),
        ("hetlora", "continue", False, False),
        ("flora", "residual", False, False),
        ("flexlora", "continue", False, False),
        ("ffa", "continue", True, True),
    ],
)
def test_client_behaviour_flags(name, mode, freeze, equal) -> None:
    aggregator = get_aggregator(name)
    assert (aggregator.client_mode, aggregator.freeze_A) == (mode, freeze)
    assert aggregator.requires_equal_ranks is equal
    aggregator.validate_ranks([8, 8])
    if equal:
        with pytest.raises(AggregationError):
            aggregator.validate_ranks([4, 8])
    else:
        aggregator.validate_ranks([2, 4, 16])
    with pytest.raises(AggregationError, match="positive"):
        aggregator.validate_ranks([0, 4])


def test_fedavg_with_mixed_ranks_raises(updates_factory) -> None:
    with pytest.raises(AggregationError, match="equal ranks"):
        get_aggregator("fedavg").aggregate(updates_factory([4, 8], [1, 1]), None)
    with pytest.raises(AggregationError, match="flora"):
        get_aggregator("fedavg").validate_ranks([4, 8])


def test_empty_round_is_an_aggregation_error() -> None:
    for name in NAMES:
        with pytest.raises(AggregationError):
            get_aggregator(name).aggregate([], None)


def test_mismatched_modules_are_rejected(updates_factory) -> None:
    updates = updates_factory([4], [1], modules=("q",)) + updates_factory([4], [1], modules=("k",))
    for name in ("zeropad", "flora", "flexlora"):
        with pytest.raises(AggregationError, match="modules"):
            get_aggregator(name).aggregate(updates, None)


@pytest.mark.parametrize("name", ["fedavg", "zeropad", "hetlora", "flora", "flexlora", "ffa"])
def test_aggregate_is_pure(name, gen, updates_factory) -> None:
    if name == "ffa":
        from fedtune.core.adapters import ClientUpdate, LoraFactors

        A = torch.randn(4, 40, generator=gen)
        updates = [
            ClientUpdate({"q": LoraFactors(A=A, B=torch.randn(48, 4, generator=gen))}, n)
            for n in (1, 2)
        ]
    else:
        ranks = [4, 4] if name == "fedavg" else [2, 6]
        updates = updates_factory(ranks, [1, 2])
    snapshot = [{m: (f.A.clone(), f.B.clone()) for m, f in u.factors.items()} for u in updates]
    first = get_aggregator(name).aggregate(updates, None)
    torch.manual_seed(0)
    torch.randn(3)  # global RNG state must not matter
    second = get_aggregator(name).aggregate(updates, None)
    for module in first.factors:
        assert torch.equal(first.factors[module].A, second.factors[module].A)
        assert torch.equal(first.factors[module].B, second.factors[module].B)
    for u, snap in zip(updates, snapshot, strict=True):
        for m, (A, B) in snap.items():
            assert torch.equal(u.factors[m].A, A) and torch.equal(u.factors[m].B, B)
