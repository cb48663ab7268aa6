"""Fed-SB through the real strategy and ClientApp (in-process Grid): clients train and send
only R, r^2 floats per module, measured from the reply messages next to fedavg's on the
same model and rank; the global adapter stays B_0 R over the seeded A_0.

The runs are the session's hetero comparison (``hetero_comparison`` in tests/conftest.py):
six clients, 2 rounds (round 2 starts from the global), no federation of its own."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.core.init import seeded_latent_basis, seeded_lora_A
from tests.support.hetero import CLIENTS

#: tiny model: 2 layers x (q_proj 64 -> 64, v_proj 64 -> 32)
MODULES = {f"base_model.model.model.layers.{i}.self_attn.{m}": out
           for i in range(2) for m, out in (("q_proj", 64), ("v_proj", 32))}
IN = 64


def _train_lines(comparison, aggregator: str) -> list[dict]:
    lines = (comparison.run_dir(aggregator) / "metrics.jsonl").read_text().splitlines()
    return [x for x in map(json.loads, lines) if x["phase"] == "train"]


@pytest.mark.parametrize("aggregators", [("fedsb", "fedavg")])
def test_fedsb_clients_send_r_squared_per_module(aggregators, hetero_comparison):
    fedsb, fedavg = (_train_lines(hetero_comparison, a) for a in aggregators)
    rank = fedsb[0]["rank"]
    assert {x["rank"] for x in fedsb + fedavg} == {rank} and len(fedsb) == 2 * CLIENTS
    # bytes per reply, from the messages; framing = what a reply costs beyond its floats
    sb_up, avg_up = {x["bytes_up"] for x in fedsb}, {x["bytes_up"] for x in fedavg}
    assert len(sb_up) == 1 and len(avg_up) == 1
    sb_floats = len(MODULES) * rank * rank
    avg_floats = sum(rank * IN + out * rank for out in MODULES.values())
    sb_framing = (min(sb_up) - 4 * sb_floats) / len(MODULES)  # one array per module
    avg_framing = (min(avg_up) - 4 * avg_floats) / (2 * len(MODULES))  # A and B
    assert sb_framing == avg_framing  # the same header per array: the rest is r^2 floats
    assert 0 < sb_framing < 300
    print(f"rank {rank}: bytes up per client: fedsb {min(sb_up)}, fedavg {min(avg_up)}")
    # the global adapter is (A_0, B_0 R): A the seeded init, B in the basis' span
    run_dir = hetero_comparison.run_dir("fedsb")
    state = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for module, out in MODULES.items():
        A, B = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        assert torch.equal(A, seeded_lora_A(0, module, (rank, IN)))
        basis = seeded_latent_basis(0, module, out, rank)
        R = torch.linalg.lstsq(basis, B).solution
        assert (basis @ R - B).abs().max() < 1e-6 * max(1.0, B.abs().max().item())
        assert B.abs().max() > 0
