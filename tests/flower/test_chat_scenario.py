"""simulations/chat.toml end to end on the real SmolLM2-135M-Instruct: chit-chat users'
exchanges through its chat template, assistant-only loss, examples packed whole, on the
in-process Grid (the real round loop and ClientApp; the model loads once)."""

import json

import pytest

from fedtune.config import load_scenario
from fedtune.flower.inprocess_grid import simulate_in_process


@pytest.mark.slow
@pytest.mark.e2e
def test_chat_scenario_lowers_held_out_assistant_token_perplexity(tmp_path):
    scenario = load_scenario("simulations/chat.toml", [
        "data.num_clients=2", "run.rounds=1", "train.steps=2", "train.batch_size=2",
        "data.max_samples_per_client=16", "data.max_eval_sequences=2", "report.generations=0",
    ])
    assert scenario.data.chat_template == "base" and scenario.data.assistant_only_loss
    run_dir = simulate_in_process(scenario, out_dir=tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["eval_tokens"] == "assistant"
    before, after = summary["initial"]["eval_perplexity"], summary["final"]["eval_perplexity"]
    assert after < before
