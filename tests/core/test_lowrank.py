"""Factored linear algebra against an independent dense float64 computation."""

from __future__ import annotations

import pytest
import torch

from fedtune.core.adapters import LoraFactors
from fedtune.core.lowrank import factored_svd, frobenius_norm, stack, truncate

OUT, IN = 60, 50


def _pair(gen: torch.Generator, rank: int, dtype: torch.dtype = torch.float64):
    B = torch.randn(OUT, rank, generator=gen, dtype=torch.float64).to(dtype)
    A = torch.randn(rank, IN, generator=gen, dtype=torch.float64).to(dtype)
    return B, A


def _dense(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return B.double() @ A.double()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def test_stack_is_exact_weighted_sum_for_mixed_ranks(gen: torch.Generator) -> None:
    ranks, weights, scales = [2, 5, 3], [0.2, 0.5, 0.3], [2.0, 0.5, 1.5]
    factors = [LoraFactors(A=a, B=b, scale=s)
               for r, s in zip(ranks, scales, strict=True) for b, a in [_pair(gen, r)]]
    B, A = stack(factors, weights)
    expected = sum(w * f.scale * _dense(f.B, f.A)
                   for w, f in zip(weights, factors, strict=True))
    assert B.shape == (OUT, sum(ranks)) and A.shape == (sum(ranks), IN)
    torch.testing.assert_close(_dense(B, A), expected, rtol=1e-12, atol=1e-12)


def test_stack_rejects_mismatched_inputs(gen: torch.Generator) -> None:
    b, a = _pair(gen, 2)
    f = LoraFactors(A=a, B=b)
    with pytest.raises(ValueError, match="weights"):
        stack([f, f], [1.0])
    g = LoraFactors(A=a[:, :10], B=b)
    with pytest.raises(ValueError, match="shapes"):
        stack([f, g], [0.5, 0.5])


def test_frobenius_norm_matches_dense(gen: torch.Generator) -> None:
    B, A = _pair(gen, 7)
    assert frobenius_norm(B, A) == pytest.approx(float(_dense(B, A).norm()), rel=1e-12)
    assert frobenius_norm(torch.zeros(OUT, 3), torch.zeros(3, IN)) == 0.0


@pytest.mark.parametrize("rank", [1, 8, 30, 70])
def test_factored_svd_matches_dense_svd(gen: torch.Generator, rank: int) -> None:
    B, A = _pair(gen, rank)
    U, S, Vh = factored_svd(B, A)
    dense_s = torch.linalg.svdvals(_dense(B, A))
    k = min(OUT, IN, rank)
    assert U.shape == (OUT, k) and S.shape == (k,) and Vh.shape == (k, IN)
    torch.testing.assert_close(S, dense_s[:k], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, _dense(B, A), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=U.dtype), rtol=0, atol=1e-10)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(k, dtype=U.dtype), rtol=0, atol=1e-10)
    assert bool((S[:-1] >= S[1:]).all())


@pytest.mark.parametrize(("out", "inp", "rank"), [(10, 50, 30), (50, 10, 30), (8, 8, 20)])
def test_factored_svd_when_the_rank_exceeds_a_side(gen, out: int, inp: int, rank: int) -> None:
    B = torch.randn(out, rank, generator=gen, dtype=torch.float64)
    A = torch.randn(rank, inp, generator=gen, dtype=torch.float64)
    U, S, Vh = factored_svd(B, A)
    k = min(out, inp)
    assert U.shape == (out, k) and Vh.shape == (k, inp)
    torch.testing.assert_close(S, torch.linalg.svdvals(B @ A), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U * S @ Vh, B @ A, rtol=1e-10, atol=1e-10)
    B_r, A_r, error = truncate(B, A, 3)
    assert B_r.shape == (out, 3) and A_r.shape == (3, inp)
    assert error == pytest.approx(float(S[3:].norm() / S.norm()), rel=1e-9)


def test_factored_svd_returns_input_dtype(gen: torch.Generator) -> None:
    B, A = _pair(gen, 6, dtype=torch.float32)
    U, S, Vh = factored_svd(B, A)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    dense_s = torch.linalg.svdvals(_dense(B, A))
    torch.testing.assert_close(S.double(), dense_s[:6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", ["balanced", "left"])
def test_truncate_is_the_eckart_young_best_approximation(
    gen: torch.Generator, split: str
) -> None:
    B, A = _pair(gen, 12)
    W = _dense(B, A)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = 5
    B_r, A_r, error = truncate(B, A, r, split=split)
    best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    assert B_r.shape == (OUT, r) and A_r.shape == (r, IN)
    torch.testing.assert_close(_dense(B_r, A_r), best, rtol=1e-9, atol=1e-9)
    expected_error = float(S[r:].norm() / S.norm())
    assert error == pytest.approx(expected_error, rel=1e-9)
    assert float((W - _dense(B_r, A_r)).norm() / W.norm()) == pytest.approx(error, rel=1e-9)


def test_truncate_balanced_split_shares_the_spectrum(gen: torch.Generator) -> None:
    B, A = _pair(gen, 9)
    B_r, A_r, _ = truncate(B, A, 4)
    torch.testing.assert_close(B_r.norm(dim=0), A_r.norm(dim=1), rtol=1e-10, atol=1e-10)
    _, A_left, _ = truncate(B, A, 4, split="left")
    torch.testing.assert_close(A_left @ A_left.T, torch.eye(4, dtype=A.dtype), rtol=0, atol=1e-10)


def test_truncate_is_exact_when_rank_fits(gen: torch.Generator) -> None:
    B, A = _pair(gen, 6, dtype=torch.float32)
    B_r, A_r, error = truncate(B, A, 64)
    assert B_r.shape[1] == 6 and B_r.dtype == A_r.dtype == torch.float32
    assert error < 1e-7
    rel = (_dense(B_r, A_r) - _dense(B, A)).norm() / _dense(B, A).norm()
    assert float(rel) < 1e-6


def test_truncate_of_zero_product_reports_no_error() -> None:
    B_r, A_r, error = truncate(torch.zeros(OUT, 4), torch.zeros(4, IN), 2)
    assert error == 0.0 and float(B_r.abs().sum() + A_r.abs().sum()) == 0.0


def test_truncate_rejects_bad_arguments(gen: torch.Generator) -> None:
    B, A = _pair(gen, 4)
    with pytest.raises(ValueError, match="rank"):
        truncate(B, A, 0)
    with pytest.raises(ValueError, match="split"):
        truncate(B, A, 2, split="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inner"):
        truncate(B, A[:3], 2)
