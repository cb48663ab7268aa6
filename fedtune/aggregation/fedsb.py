"""Fed-SB (arXiv 2502.15436): fixed shared B_0 and A_0, clients train an r x r matrix R.

A module's update is s * B_0 R A_0. A_0 is the shared seeded LoRA init every client
already draws (``fedtune.core.init``), B_0 a fixed seeded basis of its own
(``seeded_latent_basis``); the server fixes both before round 1, from the seed tree,
instead of from the first round's gradients as the paper's LoRA-SB init does: a seeded
pair costs no extra round, depends on no client's data, and the server can rebuild it
from ``run.seed`` alone. Clients train only R (client mode "latent", see
``fedtune.model.lora.install_latent``) and send only R: r^2 numbers per module whatever
the model's width. Since R -> B_0 R A_0 is linear and B_0, A_0 are shared,

    sum_k p_k s_k B_0 R_k A_0 = B_0 (sum_k p_k s_k R_k) A_0,

averaging R is exact. The server turns each reply into ordinary factors
(A_0, B_start + B_0 R) (``expand_latent``), so the global adapter, evaluation, export and
the round's checks stay those of any LoRA, and this aggregator averages B under the
shared A_0, which is averaging R.

Mixed ranks are refused: nested bases would make the aggregation exact (a rank-r_k
client's R_k padded into the top-left block of R), but a rank-r_k client could only
download that r_k x r_k block, so it would not start from the global model (the zero-
padding loss), and Fed-SB assumes one r. Client-level DP is not offered yet: the DP
wrapper would noise B (out x r numbers) where R (r^2) is all that needs noise.
"""

from __future__ import annotations

from collections.abc import Mapping

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
from fedtune.core.codec import A_SUFFIX, module_name

#: the wire key of a module's R: ``<module>.lora_R.weight`` (never a peft key)
LATENT_SUFFIX = ".lora_R.weight"


def latent_key(module: str) -> str:
    return module + LATENT_SUFFIX


def latent_module(key: str) -> str:
    """The module a latent key belongs to; ValueError for any other key."""
    if not key.endswith(LATENT_SUFFIX):
        raise ValueError(f"{key!r} is not a Fed-SB key (expected it to end in {LATENT_SUFFIX})")
    return key[: -len(LATENT_SUFFIX)]


def latent_shapes(lora_state: Mapping[str, Tensor]) -> dict[str, tuple[int, int]]:
    """What a client of this LoRA (peft keys -> tensors) sends under Fed-SB: key -> (r, r)."""
    return {latent_key(module_name(k)): (int(v.shape[0]),) * 2
            for k, v in lora_state.items() if k.endswith(A_SUFFIX)}


def expand_latent(start: LoraFactors, basis: Tensor, R: Tensor) -> LoraFactors:
    """The client's LoRA after training R: A as it started, B = B_start + B_0 R."""
    if R.shape != (start.rank, start.rank) or basis.shape != start.B.shape:
        raise ValueError(f"R {tuple(R.shape)} and basis {tuple(basis.shape)} do not fit a "
                         f"rank-{start.rank} LoRA with B {tuple(start.B.shape)}")
    return LoraFactors(A=start.A, B=start.B + basis.to(R.dtype) @ R, scale=start.scale)


@register
class FedSB(Aggregator):
    """Average B under the shared, frozen A_0 (every B is B_0 times an r x r matrix, so
    this is averaging R); A must be identical everywhere."""

    name = "fedsb"
    #: not ``additive`` although the mean of R is a sum: secure aggregation sums LoRA
    #: factor entries, and a fedsb reply carries R instead (a secure sum of R is to do)
    capabilities = Capabilities(
        client_mode="latent", freeze_A=True,
        no_dp_reason="it has no DP form yet: the DP wrapper would noise B (out x r numbers "
                     "per module) where only R (r x r) needs noise")

    def aggregate(
        self, updates: list[ClientUpdate], previous: GlobalAdapter | None
    ) -> GlobalAdapter:
        weights = example_weights(updates)
        merged: dict[str, LoraFactors] = {}
        for module in common_modules(updates):
            parts = module_parts(updates, module)
            A = _shared_A(module, updates, previous)
            scale = shared_scale(parts)
            B = sum(w * (p.scale / scale) * p.B for w, p in zip(weights, parts, strict=True))
            merged[module] = LoraFactors(A=A, B=B, scale=scale)
        return GlobalAdapter(merged, round=next_round(previous))


def _shared_A(module: str, updates: list[ClientUpdate], previous: GlobalAdapter | None
              ) -> Tensor:
    """A_0, checked to be bit-identical in every update and in the previous global (it is
    never trained nor sent: the server itself rebuilt each update's A)."""
    reference = updates[0].factors[module].A
    others = [(f"client {u.client_id or i}", u.factors[module].A)
              for i, u in enumerate(updates)]
    if previous is not None and module in previous.factors:
        others.append(("the previous global adapter", previous.factors[module].A))
    for who, candidate in others[1:]:
        if candidate.shape != reference.shape:
            raise AggregationError(f"fedsb: module {module!r} A of {who} has shape "
                                   f"{tuple(candidate.shape)}, expected "
                                   f"{tuple(reference.shape)} (fedsb needs one shared rank)")
        if not torch.equal(candidate.to(reference.dtype), reference):
            raise AggregationError(f"fedsb: module {module!r} A of {who} differs from the "
                                   "shared A_0; was it trained or drawn with another seed?")
    return reference
