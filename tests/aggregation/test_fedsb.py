"""Fed-SB: updates B_start + B_0 R_k under the shared A_0, averaged exactly (against a dense
float64 sum of B_0 R_k A_0), the seeded basis, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from fedtune.aggregation import AggregationError, capabilities_of, get_aggregator
from fedtune.aggregation.fedsb import expand_latent, latent_key, latent_module
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors
from fedtune.core.init import seeded_latent_basis

RANK = 4
SHAPES = {"q": (48, 40), "v": (24, 40), "o": (40, 56)}  # module -> (out, in)
EXAMPLES = [7, 30, 13]
SCALES = [2.0, 0.5, 2.0]


def _round(gen: torch.Generator) -> tuple[list[ClientUpdate], dict, dict, dict]:
    """Float64 clients of one round: shared A_0, a shared start B, each its own R_k."""
    A0 = {m: torch.randn(RANK, i, generator=gen, dtype=torch.float64)
          for m, (_, i) in SHAPES.items()}
    basis = {m: seeded_latent_basis(0, m, o, RANK).double() for m, (o, _) in SHAPES.items()}
    start = {m: torch.randn(o, RANK, generator=gen, dtype=torch.float64)
             for m, (o, _) in SHAPES.items()}
    Rs = [{m: torch.randn(RANK, RANK, generator=gen, dtype=torch.float64) for m in SHAPES}
          for _ in EXAMPLES]
    updates = [ClientUpdate(
        {m: expand_latent(LoraFactors(A=A0[m], B=start[m], scale=s), basis[m], R[m])
         for m in SHAPES}, num_examples=n, client_id=f"c{k}")
        for k, (n, s, R) in enumerate(zip(EXAMPLES, SCALES, Rs, strict=True))]
    return updates, A0, basis, {"start": start, "R": Rs}


def test_fedsb_averages_R_exactly(gen) -> None:
    updates, A0, basis, parts = _round(gen)
    adapter = get_aggregator("fedsb").aggregate(updates, None)
    p = [n / sum(EXAMPLES) for n in EXAMPLES]
    for m in SHAPES:
        # dense: sum_k p_k s_k (B_start + B_0 R_k) A_0, formed out x in in float64
        dense = sum(pk * s * (parts["start"][m] + basis[m] @ R[m]) @ A0[m]
                    for pk, s, R in zip(p, SCALES, parts["R"], strict=True))
        assert (adapter.delta(m) - dense).abs().max() < 1e-5
        assert torch.equal(adapter.factors[m].A, A0[m])
        # the global B is B_start (scaled) + B_0 times the weighted average of R
        scale = adapter.factors[m].scale
        R_avg = sum(pk * s / scale * R[m] for pk, s, R in zip(p, SCALES, parts["R"],
                                                               strict=True))
        start = sum(pk * s / scale for pk, s in zip(p, SCALES, strict=True)) * parts["start"][m]
        assert torch.allclose(adapter.factors[m].B, start + basis[m] @ R_avg, atol=1e-10)


def test_seeded_basis_is_the_same_everywhere_and_scaled_for_lora_steps() -> None:
    a = seeded_latent_basis(3, "base_model.model.layers.0.q_proj", 4096, 8)
    assert torch.equal(a, seeded_latent_basis(3, "base_model.model.layers.0.q_proj", 4096, 8))
    assert not torch.equal(a, seeded_latent_basis(4, "base_model.model.layers.0.q_proj",
                                                  4096, 8))
    assert not torch.equal(a, seeded_latent_basis(3, "base_model.model.layers.0.v_proj",
                                                  4096, 8))
    assert a.shape == (4096, 8) and a.dtype == torch.float32
    # columns of norm ~ sqrt(out / r): a step of lr on R moves B as a LoRA step would
    assert a.norm(dim=0).mean().item() == pytest.approx((4096 / 8) ** 0.5, rel=0.05)


def test_latent_keys_and_expansion_checks() -> None:
    assert latent_module(latent_key("a.b.q_proj")) == "a.b.q_proj"
    with pytest.raises(ValueError, match="not a Fed-SB key"):
        latent_module("a.b.q_proj.lora_A.weight")
    start = LoraFactors(A=torch.zeros(2, 5), B=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="do not fit"):
        expand_latent(start, torch.zeros(3, 2), torch.zeros(3, 3))


def test_fedsb_rejects_a_differing_A_and_mixed_ranks(gen) -> None:
    updates, *_ = _round(gen)
    moved = updates[1].factors["q"]
    updates[1] = ClientUpdate({**updates[1].factors,
                               "q": LoraFactors(A=moved.A + 1e-6, B=moved.B)},
                              num_examples=1, client_id="bob")
    with pytest.raises(AggregationError, match="bob"):
        get_aggregator("fedsb").aggregate(updates, None)
    updates, *_ = _round(gen)
    first = get_aggregator("fedsb").aggregate(updates, None)
    drifted = GlobalAdapter({m: LoraFactors(A=f.A * 1.1, B=f.B) for m, f in
                             first.factors.items()}, round=1)
    with pytest.raises(AggregationError, match="previous"):
        get_aggregator("fedsb").aggregate(updates, drifted)
    assert get_aggregator("fedsb").aggregate(updates, first).round == 2
    with pytest.raises(AggregationError, match="same rank"):
        get_aggregator("fedsb").validate_ranks([4, 8])


def test_fedsb_capabilities() -> None:
    caps = capabilities_of("fedsb")
    assert (caps.mixed_ranks, caps.additive, caps.client_mode, caps.freeze_A, caps.dp_form,
            caps.merges) == (False, False, "latent", True, None, False)
