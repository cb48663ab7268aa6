"""simulations/hetero.toml (tiny model) under every aggregator, through the round loop and
the real ClientApp (in-process Grid): clients train the ranks of their device profiles,
the run completes, and the exported adapter loads with peft.

The run of each aggregator is the one in the session's hetero comparison
(``hetero_comparison`` in tests/conftest.py), which tests/test_compare.py checks too."""

import json
from dataclasses import replace

import pytest
from peft import PeftModel

from fedtune.aggregation import available, capabilities_of
from fedtune.config import ConfigError, load_scenario
from fedtune.flower.inprocess_grid import simulate_in_process
from fedtune.model.loading import load_base_model
from fedtune.planning.client_settings import client_settings
from fedtune.runs.compare import with_aggregator
from fedtune.runs.simulate import simulate
from fedtune.train import combine
from fedtune.train.held_out import evaluate_client
from tests.support.hetero import CLIENTS, hetero


def _unnamed(scenario) -> dict:
    fields = scenario.to_dict()
    return {**fields, "run": {k: v for k, v in fields["run"].items() if k != "name"}}


@pytest.mark.parametrize("aggregator", available())
def test_hetero_completes_under_every_aggregator(aggregator, hetero_comparison):
    scenario = with_aggregator(hetero_comparison.scenario, aggregator)
    assert _unnamed(scenario) == _unnamed(hetero(aggregator))  # only the run's name differs
    settings = client_settings(scenario)
    ranks = {s.rank for s in settings}
    assert len({s.profile for s in settings}) == 4 and scenario.data.num_clients == CLIENTS
    if not capabilities_of(aggregator).mixed_ranks:
        assert len(ranks) == 1  # rank_policy auto: the smallest profile rank for everyone
    else:
        assert len(ranks) >= 3
    run_dir = hetero_comparison.run_dir(aggregator)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["scenario"]["federation"]["aggregator"] == aggregator
    assert all(r["clients_replied"] == scenario.data.num_clients for r in summary["rounds"])
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = {(x["client"], x["rank"]) for x in lines if x["phase"] == "train"}
    assert trained == {(str(s.partition), s.rank) for s in settings}
    # the exported adapter is exactly what was evaluated
    if aggregator in ("flora", "zeropad"):
        base, _ = load_base_model(replace(scenario.model, quantization="none"))
        model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
        pids = [s.partition for s in settings if s.quantization == "none"]
        mine = combine([evaluate_client(model, scenario, p, batch_size=8) for p in pids])
        reported = [x for x in lines if x["phase"] == "eval" and x["round"] == 2
                    and x["partition_id"] in pids]
        tokens = sum(x["eval_tokens"] for x in reported)
        expected = sum(x["eval_loss"] * x["eval_tokens"] for x in reported) / tokens
        assert mine.loss == pytest.approx(expected, abs=1e-4)


@pytest.fixture(scope="module")
def flora_global(tmp_path_factory):
    """One flora run whose clients start from the global top components under a rank
    budget, for the two tests below."""
    scenario = hetero("flora", 'federation.flora_init="global"', "federation.rank_budget=8",
                      "run.rounds=3")
    return scenario, simulate_in_process(scenario, out_dir=tmp_path_factory.mktemp("flora"))


def test_flora_download_is_bounded_by_the_rank_budget(flora_global):
    scenario, run_dir = flora_global
    summary = json.loads((run_dir / "summary.json").read_text())
    round2 = summary["rounds"][1]
    # tiny model: 2 layers x (q 64x64, v 32x64): rank-8 adapter = 8*(64+64+64+32)*2 floats
    budget_bytes = 8 * (64 + 64 + 64 + 32) * 2 * 4
    per_client = round2["bytes_down"] / scenario.data.num_clients
    assert budget_bytes <= per_client < budget_bytes + 2000
    assert 0.0 < round2["truncation_error_max"] < 1.0


def test_mixed_ranks_with_fedavg_are_a_configuration_error():
    scenario = hetero("fedavg", 'clients.rank_policy="profile"')
    with pytest.raises(ConfigError, match="fedavg.*cannot serve the client ranks"):
        client_settings(scenario)


def test_rank_larger_than_the_model_allows_is_a_configuration_error(tmp_path):
    scenario = load_scenario("tiny", ["lora.rank=128", "lora.alpha=128"])
    with pytest.raises(ConfigError, match="larger than the target modules"):
        simulate(scenario, out_dir=tmp_path)  # the engine's own checks, before it starts
    assert not any(tmp_path.iterdir())


def test_flora_clients_can_start_from_the_global_top_components(flora_global):
    scenario, run_dir = flora_global
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [r["eval_loss"] for r in summary["rounds"]]
    assert summary["status"] == "completed" and losses[-1] < summary["initial"]["eval_loss"]
    assert all(r["clients_replied"] == scenario.data.num_clients for r in summary["rounds"])
