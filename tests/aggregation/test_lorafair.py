"""LoRA-FAIR: averaged A, and B corrected to the least-squares fit of the exact weighted sum,
checked against a dense float64 solve that forms W* and A's pseudo-inverse itself."""

from __future__ import annotations

import pytest
import torch
from lora_reference import exact_average, rel

from fedtune.aggregation import AggregationError, capabilities_of, get_aggregator
from fedtune.core.adapters import ClientUpdate, LoraFactors

EXAMPLES = [7, 30, 13]
SCALES = [2.0, 0.5, 1.0]
MODULES = ("q", "v", "o")


def _updates(gen: torch.Generator, rank: int = 4) -> list[ClientUpdate]:
    """Float64 updates, mixed weights and scales, modules of different shapes."""
    shapes = {"q": (48, 40), "v": (24, 40), "o": (40, 56)}
    return [ClientUpdate(
        factors={m: LoraFactors(A=torch.randn(rank, i, generator=gen, dtype=torch.float64),
                                B=torch.randn(o, rank, generator=gen, dtype=torch.float64),
                                scale=s)
                 for m, (o, i) in shapes.items()},
        num_examples=n, client_id=f"c{k}")
        for k, (n, s) in enumerate(zip(EXAMPLES, SCALES, strict=True))]


def _dense_reference(updates: list[ClientUpdate], module: str) -> torch.Tensor:
    """argmin over B of ||B A - W*||: W* dense, A the plain average, solved by lstsq."""
    total = sum(u.num_examples for u in updates)
    A = sum(u.num_examples / total * u.factors[module].A.double() for u in updates)
    target = exact_average(updates, module)  # sum_k p_k s_k B_k A_k, dense
    B_t = torch.linalg.lstsq(A.T, target.T).solution  # A^T B^T = W*^T in least squares
    return B_t.T @ A


def test_lorafair_equals_the_dense_least_squares_fit(gen) -> None:
    updates = _updates(gen)
    adapter = get_aggregator("lorafair").aggregate(updates, None)
    total = sum(EXAMPLES)
    for module in MODULES:
        f = adapter.factors[module]
        A_avg = sum(n / total * u.factors[module].A for n, u in zip(EXAMPLES, updates,
                                                                     strict=True))
        assert torch.allclose(f.A, A_avg, atol=1e-12)
        assert (adapter.delta(module) - _dense_reference(updates, module)).abs().max() < 1e-5
        # the fit is better than plain FedAvg's product, and not exact (cross terms remain)
        fedavg_B = sum(n / total * (u.factors[module].scale / f.scale) * u.factors[module].B
                       for n, u in zip(EXAMPLES, updates, strict=True))
        exact = exact_average(updates, module)
        assert rel(adapter.delta(module), exact) < rel(f.scale * fedavg_B @ f.A, exact)
        assert rel(adapter.delta(module), exact) > 1e-3


def test_lorafair_is_exact_when_clients_share_A(gen) -> None:
    """With one A the weighted sum lies in A's row space: the correction makes it exact."""
    A = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    updates = [ClientUpdate({"q": LoraFactors(A=A, B=torch.randn(48, 3, generator=gen,
                                                                 dtype=torch.float64),
                                              scale=s)}, num_examples=n)
               for n, s in ((5, 1.0), (9, 3.0))]
    adapter = get_aggregator("lorafair").aggregate(updates, None)
    assert rel(adapter.delta("q"), exact_average(updates, "q")) < 1e-10


def test_lorafair_declares_equal_ranks_and_continue_mode(gen) -> None:
    caps = capabilities_of("lorafair")
    assert (caps.mixed_ranks, caps.additive, caps.client_mode, caps.dp_form) == (
        False, False, "continue", None)
    lorafair = get_aggregator("lorafair")
    with pytest.raises(AggregationError, match="same rank"):
        lorafair.validate_ranks([4, 8])
    mixed = [*_updates(gen, rank=4)[:1], *_updates(gen, rank=2)[:1]]
    with pytest.raises(AggregationError, match="equal ranks"):
        lorafair.aggregate(mixed, None)
    lorafair.aggregate(_updates(gen), None)
    assert 0.0 < lorafair.metrics()["lorafair_correction_max"] < 10.0
