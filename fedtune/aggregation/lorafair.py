"""LoRA-FAIR (arXiv 2411.14961): average A and B, then correct B on the server.

Averaging A and B separately (FedIT) leaves cross terms B_i A_j in the product. LoRA-FAIR
keeps the averaged A and adds a correction dB to the averaged B so that (B + dB) A is as
close as it can be to the exact weighted sum W* = sum_k p_k s_k B_k A_k. With A fixed
this is a least-squares problem in B whose solution never needs W* itself:

    B + dB = W* A^T (A A^T)^+ = (sum_k p_k s_k B_k (A_k A^T)) (A A^T)^+

Cost per module with K clients of rank r: K products A_k A^T (r^2 * in each) and
K products B_k (r x r) (out * r^2 each), one r x r pseudo-inverse (r^3): O(K r^2 (in + out)
+ r^3) time and O((in + out) r) memory, against O(out * in) for the dense W*.
The paper also adds a small regulariser on dB; plain least squares is its limit as the
weight goes to zero and is what fedtune computes. Clients continue from the corrected
factors (continue mode), so the next round starts from the best rank-r fit in A's rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedtune.aggregation.base import (
    AggregationError,
    Aggregator,
    Capabilities,
    common_modules,
    example_weights,
    module_parts,
    next_round,
)
from fedtune.aggregation.registry import register
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors, shared_scale

#: eigenvalues of A A^T below this fraction of the largest are treated as zero (the
#: averaged A may be rank-deficient, e.g. after clients that never moved)
PINV_RTOL = 1e-10


def corrected_B(parts: list[LoraFactors], weights: list[float], A: Tensor, scale: float
                ) -> Tensor:
    """The B minimising ||scale * B A - sum_k p_k s_k B_k A_k||_F for the given A, in
    factored form (float64 inside: the Gram matrix squares A's condition number)."""
    A64 = A.double()
    target = torch.zeros(parts[0].out_features, A.shape[0], dtype=torch.float64)
    for p, w in zip(parts, weights, strict=True):
        target += (w * p.scale / scale) * (p.B.double() @ (p.A.double() @ A64.T))
    gram_pinv = torch.linalg.pinv(A64 @ A64.T, rtol=PINV_RTOL, hermitian=True)
    return (target @ gram_pinv).to(parts[0].B.dtype)


@register
class LoraFair(Aggregator):
    """Average A and B with example weights; replace B by its least-squares correction."""

    name = "lorafair"
    capabilities = Capabilities()

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._correction: dict[str, float] = {}

    def aggregate(
        self, updates: list[ClientUpdate], previous: GlobalAdapter | None
    ) -> GlobalAdapter:
        weights = example_weights(updates)
        merged: dict[str, LoraFactors] = {}
        self._correction = {}
        for module in common_modules(updates):
            parts = module_parts(updates, module)
            ranks = sorted({p.rank for p in parts})
            if len(ranks) != 1:
                raise AggregationError(
                    f"lorafair needs equal ranks, module {module!r} has ranks {ranks}; use "
                    "flora, zeropad, hetlora or flexlora for mixed ranks")
            scale = shared_scale(parts)
            A = sum(w * p.A for w, p in zip(weights, parts, strict=True))
            B_avg = sum(w * (p.scale / scale) * p.B for w, p in zip(weights, parts, strict=True))
            B = corrected_B(parts, weights, A, scale)
            self._correction[module] = float((B - B_avg).norm() / B_avg.norm().clamp_min(1e-30))
            merged[module] = LoraFactors(A=A, B=B, scale=scale)
        return GlobalAdapter(merged, round=next_round(previous))

    def metrics(self) -> dict[str, float]:
        """How far the correction moved B from its plain average (relative, largest module)."""
        if not self._correction:
            return {}
        return {"lorafair_correction_max": max(self._correction.values())}
