"""End to end on the real bundled SmolLM2-135M (4-bit) and real Shakespeare: 2 clients,
one short round, through the round loop and the real ClientApp (in-process Grid: the
model loads once, not in each engine worker)."""

import json
import math

import pytest

from fedtune.config import load_scenario
from fedtune.flower.inprocess_grid import simulate_in_process


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_shakespeare_two_clients_one_round(tmp_path):
    scenario = load_scenario("default", [
        "data.num_clients=2", "run.rounds=1", "train.steps=2", "train.batch_size=2",
        "data.max_eval_sequences=2", "data.max_samples_per_client=40",
        "report.generations=0",
    ])
    assert scenario.model.source == "smollm2" and scenario.model.quantization == "4bit"
    run_dir = simulate_in_process(scenario, out_dir=tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    initial, final = summary["initial"]["eval_loss"], summary["final"]["eval_loss"]
    # a pretrained model: held-out loss on Shakespeare is that of a language model, not
    # of a random one (ln 49152 = 10.8)
    assert 1.5 < initial < 6.0 and math.isfinite(final)
    assert final < initial + 0.05
    round1 = summary["rounds"][0]
    assert round1["clients_replied"] == 2
    # LoRA r=8 on q/v of 30 layers: 460,800 fp32 parameters from each client
    assert 2 * 460_800 * 4 <= round1["bytes_up"] < 2 * 460_800 * 4 * 1.05
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
