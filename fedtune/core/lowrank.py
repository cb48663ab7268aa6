"""Factored linear algebra on low-rank products ``B @ A`` that never forms ``out x in``.

With thin QR factorisations ``B = Q_B R_B`` and ``A^T = Q_A R_A`` the product is
``B A = Q_B (R_B R_A^T) Q_A^T``: the singular values of ``B A`` are those of the small
``R x R`` core and its singular vectors are the core's, rotated by ``Q_B`` / ``Q_A``.
Everything here therefore costs ``O((out + in) R^2 + R^3)`` instead of the
``O(out * in * min(out, in))`` of a dense SVD, which is what lets the server recompress
stacked adapters every round. The Q factors stay as Householder reflectors
(``geqrf``) and are applied only to the singular vectors that are kept (``ormqr``).

Decompositions run in float64 (rounding in a QR of tall factors would otherwise
dominate the truncation errors we report); results come back in the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, cast

import torch
from torch import Tensor

from fedtune.core.adapters import LoraFactors

Split = Literal["balanced", "left"]
SPLITS: tuple[str, ...] = ("balanced", "left")


def pad_rows(t: Tensor, rows: int) -> Tensor:
    """Append zero rows up to ``rows`` (a lower-rank A in a higher-rank frame)."""
    extra = rows - t.shape[0]
    return t if extra == 0 else torch.cat([t, t.new_zeros(extra, t.shape[1])])


def pad_cols(t: Tensor, cols: int) -> Tensor:
    """Append zero columns up to ``cols`` (a lower-rank B in a higher-rank frame)."""
    return pad_rows(t.T, cols).T


class Truncation(NamedTuple):
    """Best rank-r factors of ``B @ A`` and the relative error they leave behind."""

    B: Tensor
    A: Tensor
    relative_error: float


def _check_pair(B: Tensor, A: Tensor) -> None:
    if B.dim() != 2 or A.dim() != 2:
        raise ValueError(f"B and A must be 2-D, got {tuple(B.shape)} and {tuple(A.shape)}")
    if B.shape[1] != A.shape[0]:
        raise ValueError(
            f"inner dimensions differ: B is {tuple(B.shape)} but A is {tuple(A.shape)}"
        )


def _work_dtype(t: Tensor) -> torch.dtype:
    """float64 where the device supports it (MPS has no float64)."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _output_dtype(B: Tensor, A: Tensor) -> torch.dtype:
    dtype = torch.promote_types(B.dtype, A.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def stack(factors: Sequence[LoraFactors], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Concatenate factors so that ``B_stacked @ A_stacked == sum_k w_k s_k B_k A_k``.

    Scales go into the B blocks and weights into the A blocks (FLoRA's layout), so the
    identity is exact for any mix of ranks: no cross terms ``B_i A_j`` appear.
    """
    if len(factors) != len(weights):
        raise ValueError(f"got {len(factors)} factors but {len(weights)} weights")
    if not factors:
        raise ValueError("nothing to stack")
    shapes = {(f.out_features, f.in_features) for f in factors}
    if len(shapes) != 1:
        raise ValueError(f"factors describe different (out, in) shapes: {sorted(shapes)}")
    dtype = factors[0].B.dtype
    for f in factors:
        dtype = torch.promote_types(dtype, torch.promote_types(f.A.dtype, f.B.dtype))
    B = torch.cat([f.B.to(dtype) * f.scale for f in factors], dim=1)
    A = torch.cat([f.A.to(dtype) * float(w) for f, w in zip(factors, weights, strict=True)])
    return B, A


def _gram_trace_norm(B: Tensor, A: Tensor) -> float:
    """||B A||_F^2 = trace((B^T B)(A A^T)): two R x R Gram matrices, no QR needed."""
    work = _work_dtype(B)
    b, a = B.to(work), A.to(work)
    squared = float(((b.T @ b) * (a @ a.T)).sum())
    return math.sqrt(max(squared, 0.0))


def frobenius_norm(B: Tensor, A: Tensor) -> float:
    """Frobenius norm of ``B @ A`` computed from R x R Gram matrices."""
    _check_pair(B, A)
    if B.shape[1] == 0:
        return 0.0
    return _gram_trace_norm(B, A)


class _Householder(NamedTuple):
    """Thin QR ``M = Q R`` kept as Householder reflectors: Q is applied, never formed."""

    reflectors: Tensor
    tau: Tensor
    R: Tensor

    def apply(self, X: Tensor) -> Tensor:
        """``Q_thin @ X`` for X with ``len(tau)`` rows (the cost scales with X's columns)."""
        rows = self.reflectors.shape[0]
        padded = X.new_zeros(rows, X.shape[1])
        padded[: X.shape[0]] = X
        return torch.ormqr(self.reflectors, self.tau, padded)


def _householder(M: Tensor) -> _Householder:
    a, tau = torch.geqrf(M)
    k = tau.shape[0]
    return _Householder(a[:, :k], tau, a[:k].triu())


def _svd_work(B: Tensor, A: Tensor, keep: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``B @ A`` in the working dtype: all singular values (descending), and the
    first ``keep`` singular vectors (all when None), rotated back from the core."""
    if B.shape[1] == 0:
        raise ValueError("B @ A has inner dimension 0: there is nothing to decompose")
    work = _work_dtype(B)
    qr_b, qr_a = _householder(B.to(work)), _householder(A.to(work).T)
    u_c, s, vh_c = torch.linalg.svd(qr_b.R @ qr_a.R.T, full_matrices=False)
    keep = s.shape[0] if keep is None else min(keep, s.shape[0])
    return qr_b.apply(u_c[:, :keep]), s, qr_a.apply(vh_c[:keep].T).T


def factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``U diag(S) Vh = B @ A`` with U [out, k], S [k], Vh [k, in].

    ``k = min(out, in, R)``; singular values are sorted in descending order.
    """
    _check_pair(B, A)
    dtype = _output_dtype(B, A)
    u, s, vh = _svd_work(B, A)
    return u.to(dtype), s.to(dtype), vh.to(dtype)


def _relative_tail(s: Tensor, rank: int) -> float:
    """sqrt(sum of discarded sigma^2 / sum of all sigma^2) (Eckart-Young error)."""
    total = float((s * s).sum())
    if total == 0.0:
        return 0.0
    tail = float((s[rank:] * s[rank:]).sum())
    return math.sqrt(tail / total)


def check_split(split: str) -> Split:
    """Validate a split option early (at configuration time, not mid-round)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return cast(Split, split)


def _split_factors(u: Tensor, s: Tensor, vh: Tensor, split: Split) -> tuple[Tensor, Tensor]:
    if split == "balanced":
        root = s.sqrt()
        return u * root, root[:, None] * vh
    return u * s, vh


def truncate(B: Tensor, A: Tensor, rank: int, split: Split = "balanced") -> Truncation:
    """Best rank-``rank`` approximation of ``B @ A`` (Eckart-Young), as factors.

    With ``split="balanced"`` (default) ``B_r = U sqrt(S)`` and ``A_r = sqrt(S) Vh``:
    both factors get the same spectrum, the conditioning a LoRA that keeps training
    from them wants. ``split="left"`` puts S into B and leaves A orthonormal.
    The result has ``min(rank, out, in, R)`` columns; ``relative_error`` is
    ``||BA - B_r A_r||_F / ||BA||_F`` from the discarded singular values (0 for BA = 0).
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    check_split(split)
    _check_pair(B, A)
    dtype = _output_dtype(B, A)
    u, s, vh = _svd_work(B, A, keep=rank)
    error = _relative_tail(s, rank)
    b_r, a_r = _split_factors(u, s[: u.shape[1]], vh, split)
    return Truncation(b_r.to(dtype), a_r.to(dtype), error)


def product_gram(members: Sequence[LoraFactors]) -> Tensor:
    """K x K float64 matrix of Frobenius inner products <s_i B_i A_i, s_j B_j A_j>.

    From the stacked factors' two R x R Gram matrices (R = sum of the ranks):
    <B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T)), so the whole matrix is the
    Hadamard product of the Grams, summed block by block. It costs O((out + in) R^2),
    never an out x in matrix, and any mix of ranks is fine. Every distance between
    updates, and between updates and a weighted combination of them, follows from it.
    """
    if not members:
        raise ValueError("no factors to compare")
    shapes = {(f.out_features, f.in_features) for f in members}
    if len(shapes) != 1:
        raise ValueError(f"factors describe different (out, in) shapes: {sorted(shapes)}")
    work = _work_dtype(members[0].A)
    B = torch.cat([f.B.to(work) * f.scale for f in members], dim=1)
    A = torch.cat([f.A.to(work) for f in members], dim=0)
    hadamard = (B.T @ B) * (A @ A.T)
    owner = torch.repeat_interleave(torch.arange(len(members)),
                                    torch.tensor([f.rank for f in members]))
    blocks = torch.zeros(len(members), owner.shape[0], dtype=work)
    blocks[owner, torch.arange(owner.shape[0])] = 1.0
    return blocks @ hadamard @ blocks.T
