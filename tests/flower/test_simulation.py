"""A tiny federation end to end through Flower's real simulation engine (Ray backend)."""

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedtune.config import load_scenario
from fedtune.model.loading import load_base_model
from fedtune.runs.simulate import simulate
from fedtune.train import combine
from fedtune.train.held_out import evaluate_client

pytestmark = pytest.mark.e2e  # the suite's one tiny federation on the real engine


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    scenario = load_scenario("tiny")
    run_dir = simulate(scenario, out_dir=tmp_path_factory.mktemp("runs"))
    return scenario, run_dir


def test_held_out_loss_falls(tiny_run):
    _, run_dir = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    losses = [r["eval_loss"] for r in summary["rounds"]]
    assert len(losses) == 3
    assert losses[-1] < losses[0] < summary["initial"]["eval_loss"]
    assert summary["final"]["eval_loss"] == losses[-1]


def test_summary_has_the_documented_fields(tiny_run):
    scenario, run_dir = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    for record in summary["rounds"]:
        for key in ("round", "train_loss", "eval_loss", "eval_perplexity", "bytes_up",
                    "bytes_down", "seconds"):
            assert key in record, key
        assert record["eval_perplexity"] == pytest.approx(math.exp(record["eval_loss"]))
        assert record["clients_replied"] == scenario.data.num_clients
    assert summary["final"]["eval_perplexity"] == pytest.approx(
        math.exp(summary["final"]["eval_loss"]))
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bytes_are_the_real_adapter_sizes(tiny_run):
    scenario, run_dir = tiny_run
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    adapter_bytes = sum(t.numel() * 4 for t in tensors.values())
    summary = json.loads((run_dir / "summary.json").read_text())
    n = scenario.data.num_clients
    first, later = summary["rounds"][0], summary["rounds"][1]
    assert first["bytes_down"] == 0  # round 1 starts from the shared seeded init
    # every client uploads the whole adapter: fp32 data plus, per array, a numpy header
    # and its key name (under 256 bytes)
    overhead = 256 * len(tensors)
    assert n * adapter_bytes <= first["bytes_up"] < n * (adapter_bytes + overhead)
    assert n * adapter_bytes <= later["bytes_down"] < n * (adapter_bytes + overhead)


def test_metrics_jsonl_has_one_line_per_client_per_round(tiny_run):
    scenario, run_dir = tiny_run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["phase"] == "train"]
    assert len(train) == scenario.run.rounds * scenario.data.num_clients
    per_round = {r: sorted(x["client"] for x in train if x["round"] == r) for r in (1, 2, 3)}
    assert all(clients == ["0", "1", "2", "3"] for clients in per_round.values())
    assert all(x["train_loss"] > 0 and x["bytes_up"] > 0 for x in train)


def test_saved_adapter_loads_with_peft_and_reproduces_final_loss(tiny_run):
    scenario, run_dir = tiny_run
    base, _ = load_base_model(scenario.model)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    results = [evaluate_client(model, scenario, pid) for pid in range(scenario.data.num_clients)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert combine(results).loss == pytest.approx(summary["final"]["eval_loss"], abs=1e-4)
    # and the adapter matters: the bare base model is worse
    base_only, _ = load_base_model(scenario.model)
    bare = combine([evaluate_client(base_only, scenario, pid)
                    for pid in range(scenario.data.num_clients)])
    assert bare.loss > summary["final"]["eval_loss"] + 0.05


def test_the_in_process_grid_ends_exactly_where_the_engine_does(tiny_run, tmp_path):
    """What lets the rest of the suite (and test_ray_cluster's one-machine reference)
    run federations on the in-process Grid: the same scenario gives the bit-identical
    adapter and the same losses as Flower's engine."""
    from fedtune.flower.inprocess_grid import simulate_in_process

    scenario, engine_dir = tiny_run
    grid_dir = simulate_in_process(scenario, out_dir=tmp_path)
    on_engine = load_file(engine_dir / "adapter" / "adapter_model.safetensors")
    on_grid = load_file(grid_dir / "adapter" / "adapter_model.safetensors")
    assert on_engine.keys() == on_grid.keys()
    assert all(torch.equal(on_engine[k], on_grid[k]) for k in on_engine)
    losses = [[r["eval_loss"] for r in json.loads((d / "summary.json").read_text())["rounds"]]
              for d in (engine_dir, grid_dir)]
    assert losses[0] == losses[1]
