"""An aggregator added through the registry alone runs a whole federation.

The toy rule is unlike every built-in one: the next global adapter is the update of
the client with the smallest id, unweighted ("first client wins"). The class lives only
in this file: the ServerApp builds it from the registry; the ClientApps learn how to
train from the message config (client mode, frozen A), so they do not need it. The run
is ``fedtune.runs.simulate.simulate`` on the in-process Grid (the real ServerApp loop
and ClientApp handlers; the engine is under test in tests/flower/test_simulation.py),
and every client message is handled while the registry does not know the toy, as in a
client process that never imported this file.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.aggregation import Aggregator, Capabilities, register, unregister
from fedtune.aggregation.base import example_weights, next_round
from fedtune.config import load_scenario
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors
from fedtune.core.codec import factors_from_state_dict
from fedtune.model.lora import exported_update
from tests.support.engine import engine_in_process

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


def unknown_to_clients(make_client_app):
    """``make_client_app`` whose app handles each message with the toy unregistered (the
    Grid has one handler thread and the server waits for its replies meanwhile)."""

    def make(scenario):
        app = make_client_app(scenario)

        def handle(message, context):
            unregister(TOY)
            try:
                return app(message, context)
            finally:
                register(FirstClientWins)
        return handle
    return make


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    import fedtune.flower.client_app as client_app
    import fedtune.runs.simulate as runs

    register(FirstClientWins)
    FirstClientWins.seen.clear()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(client_app, "make_client_app",
                          unknown_to_clients(client_app.make_client_app))
            with engine_in_process():
                scenario = load_scenario("tiny", [
                    f'federation.aggregator="{TOY}"', "run.rounds=2", "data.num_clients=2",
                    "federation.min_clients=2", "train.steps=2",
                    "data.max_samples_per_client=16", "data.max_eval_sequences=4"])
                run_dir = runs.simulate(scenario, out_dir=tmp_path_factory.mktemp("runs"))
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
    and compare it with the adapter the run exported (its peft scale folded in)."""
    _, run_dir = toy_run
    last = FirstClientWins.seen[-1]
    ids = sorted(u.client_id for u in last)
    assert len(set(ids)) == 2
    expected = next(u for u in last if u.client_id == ids[0]).factors
    other = next(u for u in last if u.client_id == ids[1]).factors
    exported = factors_from_state_dict(exported_update(run_dir / "adapter"), 1.0)
    assert sorted(exported) == sorted(expected)
    for module, factors in expected.items():
        got = dense(exported[module])
        assert torch.allclose(got, dense(factors), atol=1e-6), module
        # and it is not the other client's update (nor their mean): the rule did it
        assert not torch.allclose(got, dense(other[module]), atol=1e-6), module
