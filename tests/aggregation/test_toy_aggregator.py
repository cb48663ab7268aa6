"""An aggregator added through the registry alone runs a real simulation.

The toy rule is unlike every built-in one: the next global adapter is the update of
the client with the smallest id, unweighted ("first client wins"). The class lives only
in this file: the ServerApp (this process) builds it from the registry; the ClientApps
(Ray workers, which never import this file) learn how to train from the message
config (client mode, frozen A), so they do not need it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.aggregation import Aggregator, Capabilities, register, unregister
from fedtune.aggregation.base import example_weights, next_round
from fedtune.config import load_scenario
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors
from fedtune.core.codec import factors_from_state_dict

TOY = "toy-first-client"


class FirstClientWins(Aggregator):
    """The next global adapter is the update of the client with the smallest id."""

    name = TOY
    capabilities = Capabilities()  # equal ranks, not additive, no DP, no merge options
    #: every round's replies, as the server handed them over (the server runs here)
    seen: list[list[ClientUpdate]] = []

    def aggregate(self, updates: list[ClientUpdate], previous: GlobalAdapter | None
                  ) -> GlobalAdapter:
        example_weights(updates)  # an empty round is an error, as for every aggregator
        FirstClientWins.seen.append(list(updates))
        first = min(updates, key=lambda u: u.client_id)
        return GlobalAdapter(dict(first.factors), round=next_round(previous))


def dense(factors: LoraFactors) -> torch.Tensor:
    return factors.scale * factors.B.double() @ factors.A.double()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from fedtune.runs.simulate import simulate

    register(FirstClientWins)
    FirstClientWins.seen.clear()
    try:
        scenario = load_scenario("tiny", [
            f'federation.aggregator="{TOY}"', "run.rounds=2", "data.num_clients=2",
            "federation.min_clients=2", "train.steps=2", "data.max_samples_per_client=16",
            "data.max_eval_sequences=4"])
        run_dir = simulate(scenario, out_dir=tmp_path_factory.mktemp("runs"))
        yield scenario, run_dir
    finally:
        unregister(TOY)


def test_the_run_completes_with_the_toy_aggregator(toy_run):
    scenario, run_dir = toy_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert json.loads((run_dir / "scenario.json").read_text()
                      )["federation"]["aggregator"] == TOY
    assert [len(round_updates) for round_updates in FirstClientWins.seen] == [2, 2]


def test_the_exported_adapter_is_what_the_toy_rule_gives(toy_run):
    """Recompute the rule from the last round's replies, independently of ``aggregate``,
    and compare it with the adapter the run exported (scale folded in)."""
    _, run_dir = toy_run
    last = FirstClientWins.seen[-1]
    ids = sorted(u.client_id for u in last)
    assert len(set(ids)) == 2
    expected = next(u for u in last if u.client_id == ids[0]).factors
    other = next(u for u in last if u.client_id == ids[1]).factors
    exported = factors_from_state_dict(
        load_file(run_dir / "adapter" / "adapter_model.safetensors"), 1.0)
    assert sorted(exported) == sorted(expected)
    for module, factors in expected.items():
        got = dense(exported[module])
        assert torch.allclose(got, dense(factors), atol=1e-6), module
        # and it is not the other client's update (nor their mean): the rule did it
        assert not torch.allclose(got, dense(other[module]), atol=1e-6), module
