"""Shared by the Byzantine-robust aggregators (geomedian, multikrum): one round's
updates compared through their Gram matrix, never as dense out x in matrices.

Client k's update is the whole adapter it sent, D_k = (s_k B_k A_k per module), taken
as one vector over every module (as RFA and Krum treat a model). With
G_ij = <D_i, D_j> (``core.lowrank.product_gram``, summed over modules), every distance
the methods need is a quadratic form in G: ||D_i - D_j||^2 = G_ii + G_jj - 2 G_ij, and
for a combination z = sum_j beta_j D_j, ||z - D_k||^2 = beta^T G beta - 2 (G beta)_k +
G_kk. A method only chooses the coefficients beta; the result, previous + sum_k beta_k
D_k, is held as a weighted stack and recompressed to ``rank_budget`` (as flora does),
so it is exact up to that truncation for any mix of ranks.

Why they refuse secure aggregation and client-level DP (``Capabilities``): both need
each client's own update (SecAgg gives the server only the sum), and the coefficients
depend on every other client's update, so removing one client can move the whole
aggregate (a Krum selection flips, the median jumps between clusters) by far more than
its clipped share C / m: the clip norm does not bound their sensitivity.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from fedtune.aggregation.base import (
    Aggregator,
    Capabilities,
    common_modules,
    example_weights,
    module_parts,
    next_round,
)
from fedtune.aggregation.recompress import TruncationReport, stack_and_truncate
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors
from fedtune.core.lowrank import Split, check_split, product_gram

ROBUST_NO_DP = ("the coefficients of a robust aggregate depend on every other client's "
                "update, so adding or removing one client can move the whole aggregate "
                "(a Krum selection flips, a geometric median jumps between clusters) by "
                "far more than its clipped share: the clip norm does not bound its "
                "sensitivity")
ROBUST_NO_SECAGG = ("a robust aggregate compares each client's own update with the "
                    "others', and under secure aggregation the server sees only their sum")
ROBUST_CAPABILITIES = Capabilities(mixed_ranks=True, dp_form=None, no_dp_reason=ROBUST_NO_DP,
                                   no_secagg_reason=ROBUST_NO_SECAGG, client_mode="residual")


def round_gram(updates: Sequence[ClientUpdate], modules: Sequence[str]) -> Tensor:
    """G_ij = <D_i, D_j> over all modules together (float64, K x K)."""
    return sum(product_gram(module_parts(list(updates), m)) for m in modules)  # type: ignore[return-value]


def squared_distances(gram: Tensor) -> Tensor:
    """||D_i - D_j||^2 for every pair (clamped at 0 against rounding)."""
    diag = gram.diagonal()
    return (diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0.0)


def distances_to_combination(gram: Tensor, beta: Tensor) -> Tensor:
    """||sum_j beta_j D_j - D_k|| for every k."""
    squared = beta @ gram @ beta - 2 * (gram @ beta) + gram.diagonal()
    return squared.clamp_min(0.0).sqrt()


def combination_norm(gram: Tensor, beta: Tensor) -> float:
    """||sum_j beta_j D_j||."""
    return float((beta @ gram @ beta).clamp_min(0.0).sqrt())


class RobustCenter(TruncationReport, Aggregator):
    """previous + sum_k beta_k D_k with beta from :meth:`coefficients`, recompressed."""

    capabilities = ROBUST_CAPABILITIES

    def __init__(self, options: object = None, /, split: Split = "balanced",
                 **values: object) -> None:
        super().__init__(options, **values)
        self.split: Split = check_split(split)
        self.last_truncation_errors: dict[str, float] = {}
        self.last_coefficients: list[float] = []

    @property
    def rank_budget(self) -> int:
        return self.options.rank_budget  # type: ignore[attr-defined, no-any-return]

    def dp_release_rank(self, ranks: Sequence[int]) -> int:
        return self.rank_budget

    @abstractmethod
    def coefficients(self, gram: Tensor, weights: Tensor) -> Tensor:
        """beta (float64, K) from the Gram matrix and the example weights p."""

    def aggregate(self, updates: list[ClientUpdate], previous: GlobalAdapter | None
                  ) -> GlobalAdapter:
        weights = torch.tensor(example_weights(updates), dtype=torch.float64)
        modules = common_modules(updates)
        beta = self.coefficients(round_gram(updates, modules), weights)
        self.last_coefficients = [float(b) for b in beta]
        carried = {} if previous is None else dict(previous.factors)
        merged: dict[str, LoraFactors] = {}
        errors: dict[str, float] = {}
        for module in modules:
            members: list[LoraFactors] = module_parts(updates, module)
            member_weights = self.last_coefficients
            old = carried.pop(module, None)
            if old is not None:
                members, member_weights = [old, *members], [1.0, *member_weights]
            merged[module], errors[module] = stack_and_truncate(
                members, member_weights, self.rank_budget, self.split)
        merged.update(carried)  # modules nobody trained this round keep their update
        self.last_truncation_errors = errors
        return GlobalAdapter(merged, round=next_round(previous))
