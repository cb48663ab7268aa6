"""HetLoRA: norm-proportional weights and the rank self-pruning criterion."""

from __future__ import annotations

import pytest
import torch
from lora_reference import dense

from fedtune.aggregation import get_aggregator, self_prune_rank
from fedtune.core.adapters import ClientUpdate, LoraFactors


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros(rows, t.shape[1], dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


def test_weights_follow_update_norms(updates_factory) -> None:
    updates = updates_factory([2, 6, 4], [100, 1, 1], scales=[1.0, 1.0, 1.0], dtype=torch.float64)
    adapter = get_aggregator("hetlora").aggregate(updates, None)
    for module in ("q", "v"):
        norms = [float(dense(u.factors[module]).norm()) for u in updates]
        w = [n / sum(norms) for n in norms]
        A = sum(wk * _padded(u.factors[module].A, 6) for wk, u in zip(w, updates, strict=True))
        B = sum(wk * _padded(u.factors[module].B.T, 6).T for wk, u in zip(w, updates, strict=True))
        torch.testing.assert_close(adapter.factors[module].A, A)
        torch.testing.assert_close(adapter.factors[module].B, B)


def test_scale_enters_the_norm(updates_factory) -> None:
    updates = updates_factory([3, 3], [1, 1], scales=[1.0, 10.0], dtype=torch.float64)
    adapter = get_aggregator("hetlora").aggregate(updates, None)
    norms = [float(dense(u.factors["q"]).norm()) for u in updates]
    w = [n / sum(norms) for n in norms]
    A = w[0] * updates[0].factors["q"].A + w[1] * updates[1].factors["q"].A
    torch.testing.assert_close(adapter.factors["q"].A, A)


def test_all_zero_updates_fall_back_to_example_weights() -> None:
    zero = [
        ClientUpdate({"q": LoraFactors(A=torch.randn(2, 5), B=torch.zeros(4, 2))}, n)
        for n in (1, 3)
    ]
    adapter = get_aggregator("hetlora").aggregate(zero, None)
    expected = 0.25 * zero[0].factors["q"].A + 0.75 * zero[1].factors["q"].A
    torch.testing.assert_close(adapter.factors["q"].A, expected)


def _graded(strengths: list[float]) -> LoraFactors:
    """Orthogonal rank-1 components with the given norms (so tail norms are known)."""
    r = len(strengths)
    B = torch.eye(10, r, dtype=torch.float64) * torch.tensor(strengths, dtype=torch.float64)
    return LoraFactors(A=torch.eye(r, 12, dtype=torch.float64), B=B, scale=2.0)


def test_self_prune_cuts_a_weak_tail() -> None:
    # gamma = 0.5, r = 8 -> candidate 4; tail norm 0.1*2 = 0.2 vs (1-0.5)*||BA||
    factors = _graded([1.0] * 4 + [0.1] * 4)
    assert self_prune_rank(factors, 0.5) == 4


def test_self_prune_keeps_an_even_adapter() -> None:
    assert self_prune_rank(_graded([1.0] * 8), 0.5) == 8
    assert self_prune_rank(_graded([1.0] * 8), 0.9) == 8


def test_self_prune_threshold_is_one_minus_gamma() -> None:
    # r = 4, gamma = 0.75 -> keep 3; tail t, head sqrt(3): prune iff t < 0.25 * sqrt(3 + t^2)
    just_below = _graded([1.0, 1.0, 1.0, 0.44])  # 0.44 < 0.25*sqrt(3.1936) = 0.4468
    just_above = _graded([1.0, 1.0, 1.0, 0.45])  # 0.45 > 0.25*sqrt(3.2025) = 0.4474
    assert self_prune_rank(just_below, 0.75) == 3
    assert self_prune_rank(just_above, 0.75) == 4


def test_self_prune_over_a_whole_adapter_and_edge_cases() -> None:
    weak, strong = _graded([1.0, 1.0, 0.01, 0.01]), _graded([1.0, 1.0, 1.0, 1.0])
    assert self_prune_rank({"q": weak, "v": weak}, 0.5) == 2
    assert self_prune_rank({"q": weak, "v": strong}, 0.5) == 4
    assert self_prune_rank(_graded([1.0]), 0.5) == 1
    zero = LoraFactors(A=torch.randn(4, 6), B=torch.zeros(5, 4))
    assert self_prune_rank(zero, 0.5) == 4
    with pytest.raises(ValueError, match="gamma"):
        self_prune_rank(weak, 1.0)
