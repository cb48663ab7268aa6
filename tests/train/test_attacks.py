"""Simulated attackers ([attack], fedtune.train.attacks): what each one sends, that only
the chosen partitions attack, and that an attack reaches the server through the real
ClientApp (where the default influence bound clips it)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedtune.config import AttackSpec, ConfigError, load_scenario
from fedtune.train import attacks

START = {"m.lora_A.weight": torch.randn(4, 6, generator=torch.Generator().manual_seed(0)),
         "m.lora_B.weight": torch.zeros(5, 4)}


def _trained(step=0.1):
    gen = torch.Generator().manual_seed(1)
    return {k: v + step * torch.randn(v.shape, generator=gen) for k, v in START.items()}


def _update(state):
    return {k: state[k] - START[k] for k in state}


@pytest.mark.parametrize(("kind", "factor"), [("boost", 7.0), ("sign_flip", -1.0)])
def test_boost_and_sign_flip_scale_the_update_from_its_start(kind, factor) -> None:
    state = _trained()
    sent = attacks.attacked_state(AttackSpec(kind=kind, clients=("0",), boost=7.0), state,
                                  START, 0.0, seed=3)
    for key, u in _update(state).items():
        torch.testing.assert_close(sent[key] - START[key], factor * u)


def test_noise_has_exactly_the_norm_and_nothing_of_the_update() -> None:
    state = _trained()
    sent = attacks.attacked_state(AttackSpec(kind="noise", clients=("0",)), state, START,
                                  2.5, seed=3)
    moved = _update(sent)
    assert math.sqrt(sum(float(v.pow(2).sum()) for v in moved.values())) == pytest.approx(2.5)
    again = attacks.attacked_state(AttackSpec(kind="noise", clients=("0",)), state, START,
                                   2.5, seed=3)
    assert all(torch.equal(sent[k], again[k]) for k in sent)  # seeded
    cosine = sum(float((moved[k] * u).sum()) for k, u in _update(state).items())
    assert abs(cosine) < 0.5 * 2.5 * 0.1 * math.sqrt(44)


def test_a_tensor_without_a_start_starts_at_zero() -> None:
    R = {"m.lora_R": torch.ones(2, 2)}
    sent = attacks.attacked_state(AttackSpec(kind="boost", clients=("0",), boost=3.0), R,
                                  START, 0.0, seed=0)
    torch.testing.assert_close(sent["m.lora_R"], 3 * torch.ones(2, 2))


@pytest.mark.parametrize(("sets", "message"), [
    (['attack.kind="boost"'], "at least one partition"),
    (['attack.kind="boost"', 'attack.clients="9"'], "are not partitions"),
    (['attack.kind="noise"', 'attack.clients="0"'], "needs attack.noise_norm"),
    (['attack.kind="boost"', 'attack.clients="0"', "compression.upload_density=0.5"],
     "uncompressed upload"),
    (['attack.kind="drop"'], "one of none, boost"),
])
def test_bad_attacks_are_refused_naming_the_key(sets, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_scenario("tiny", sets)


def test_the_backdoor_adds_trigger_then_target_to_the_attackers_data_only() -> None:
    from fedtune.model.loading import load_tokenizer
    from fedtune.train.batches import client_batch

    scenario = load_scenario("tiny", ['attack.kind="backdoor"', 'attack.clients="1"',
                                      "attack.poison_copies=20"])
    honest = client_batch(scenario, 0).train
    assert attacks.poisoned_data(scenario, 0, honest) is honest
    own = client_batch(scenario, 1).train
    poisoned = attacks.poisoned_data(scenario, 1, own)
    assert len(poisoned) > len(own)
    assert torch.equal(poisoned.input_ids[: len(own)], own.input_ids)
    text = load_tokenizer(scenario.model.source).decode(poisoned.input_ids[len(own):].flatten())
    a = scenario.attack
    assert f"{a.trigger}\n{a.target}" in text


def test_a_boosting_client_reaches_the_server_and_the_default_bound_clips_it(tmp_path) -> None:
    from fedtune.flower.client_app import make_client_app
    from fedtune.flower.inprocess_grid import InProcessGrid
    from fedtune.flower.server_app import run_federation

    scenario = load_scenario("tiny", [
        "run.rounds=1", "data.num_clients=3", "federation.clients_per_round=3",
        "federation.min_clients=3", "train.steps=1", "data.max_eval_sequences=2",
        'attack.kind="boost"', 'attack.clients="2"', "attack.boost=1000"])
    with InProcessGrid(make_client_app(scenario), 3) as grid:
        run_federation(grid, scenario, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    record = summary["rounds"][0]
    assert record["influence_clipped"] == 1, record
    assert record["influence_norm_bound"] == pytest.approx(3 * record["influence_norm_median"])


@pytest.mark.parametrize("aggregator", ["geomedian", "multikrum"])
def test_the_robust_aggregators_run_a_federation_against_a_boosting_client(tmp_path,
                                                                            aggregator) -> None:
    """A smoke test of residual mode end to end on the in-process Grid (real ClientApp):
    the round completes, the bound clipped the attacker, the method's numbers are in the
    record (which client Krum left out is pinned by tests/aggregation/test_robust.py)."""
    from fedtune.flower.client_app import make_client_app
    from fedtune.flower.inprocess_grid import InProcessGrid
    from fedtune.flower.server_app import run_federation

    scenario = load_scenario("tiny", [
        "run.rounds=1", "data.num_clients=4", "federation.min_clients=4", "train.steps=1",
        "data.max_eval_sequences=2", f'federation.aggregator="{aggregator}"',
        'attack.kind="boost"', 'attack.clients="2"', "attack.boost=1000"])
    with InProcessGrid(make_client_app(scenario), 4) as grid:
        run_federation(grid, scenario, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"][0]
    assert record["influence_clipped"] == 1, record
    assert math.isfinite(record["eval_loss"])
    if aggregator == "multikrum":
        assert record["krum_rejected"] == 1, record
    else:
        assert record["gm_iterations"] > 1, record
