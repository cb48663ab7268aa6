"""Fed-SB through the real strategy and ClientApp (in-process Grid): clients train and send
only R, r^2 floats per module, measured from the reply messages next to fedavg's on the
same model; the global adapter stays B_0 R over the seeded A_0."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from fedtune.config import load_scenario
from fedtune.core.init import seeded_latent_basis, seeded_lora_A
from fedtune.flower.inprocess_grid import simulate_in_process

TINY = ["train.steps=3", "data.max_samples_per_client=32",
        "data.max_eval_sequences=4"]
#: tiny model: 2 layers x (q_proj 64 -> 64, v_proj 64 -> 32), LoRA rank 4
MODULES = {f"base_model.model.model.layers.{i}.self_attn.{m}": out
           for i in range(2) for m, out in (("q_proj", 64), ("v_proj", 32))}
RANK, IN = 4, 64


def _run(tmp_path, aggregator: str, rounds: int) -> tuple[dict, list[dict]]:
    scenario = load_scenario("tiny", [*TINY, f'federation.aggregator="{aggregator}"',
                                      f"run.rounds={rounds}"])
    run_dir = simulate_in_process(scenario, out_dir=tmp_path / aggregator)
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "dir": run_dir}, [x for x in lines if x["phase"] == "train"]


def test_fedsb_clients_send_r_squared_per_module(tmp_path):
    fedsb, fedsb_train = _run(tmp_path, "fedsb", rounds=2)  # round 2 starts from the global
    _, fedavg_train = _run(tmp_path, "fedavg", rounds=1)
    summary = fedsb["summary"]
    assert summary["status"] == "completed"
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    # bytes per reply, from the messages; framing = what a reply costs beyond its floats
    sb_floats = len(MODULES) * RANK * RANK
    avg_floats = sum(RANK * IN + out * RANK for out in MODULES.values())
    sb_up = {x["bytes_up"] for x in fedsb_train}
    avg_up = {x["bytes_up"] for x in fedavg_train}
    assert len(sb_up) == 1 and len(avg_up) == 1 and len(fedsb_train) == 2 * 4
    print(f"bytes up per client: fedsb {min(sb_up)}, fedavg {min(avg_up)}")
    sb_framing = (sb_up.pop() - 4 * sb_floats) / len(MODULES)  # one array per module
    avg_framing = (avg_up.pop() - 4 * avg_floats) / (2 * len(MODULES))  # A and B
    assert sb_framing == avg_framing  # same header per array: the rest is exactly r^2
    assert 0 < sb_framing < 300
    # the global adapter is (A_0, B_0 R): A the seeded init, B in the basis' span
    state = load_file(str(fedsb["dir"] / "adapter" / "adapter_model.safetensors"))
    for module, out in MODULES.items():
        A = state[f"{module}.lora_A.weight"]
        B = state[f"{module}.lora_B.weight"]
        assert torch.equal(A, seeded_lora_A(0, module, (RANK, IN)))
        basis = seeded_latent_basis(0, module, out, RANK)
        R = torch.linalg.lstsq(basis, B).solution
        assert (basis @ R - B).abs().max() < 1e-6 * max(1.0, B.abs().max().item())
        assert B.abs().max() > 0
