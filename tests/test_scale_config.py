"""Simulator scenarios that cannot run are refused before the engine starts, naming why."""

from __future__ import annotations

import os

import pytest

from fedtune.config import ConfigError, load_scenario
from fedtune.runs.simulate import SimulationError, backend_config, preflight


@pytest.mark.parametrize(("sets", "match"), [
    (["federation.clients_per_round=9"], "clients_per_round = 9 is larger than"),
    (["federation.eval_clients=5"], "eval_clients = 5 is larger than"),
    (["data.partition='dirichlet'", "data.dirichlet_alpha=0"], "dirichlet_alpha"),
    (["data.partition='dirichlet'", "data.dirichlet_alpha=-0.5"], "dirichlet_alpha"),
    (["data.partition='shards'"], "partition"),
    (["data.group_by='sender'"], "group_by"),
    (["simulation.dropout=1.0"], "dropout"),
    (["simulation.round_deadline=-1"], "round_deadline"),
    (["simulation.reference_tokens_per_s=0"], "reference_tokens_per_s"),
])
def test_bad_scale_keys_are_configuration_errors(sets: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_scenario("tiny", sets)


def test_mix_proportions_must_sum_to_one() -> None:
    mix = "clients.mix={'cpu-box-16gb' = 0.5, 'phone-class-4gb' = 0.4}"
    scenario = load_scenario("tiny", [mix])
    with pytest.raises(ConfigError, match="proportions sum to 0.9, not 1"):
        preflight(scenario)


def test_resources_the_machine_lacks_fail_before_the_engine() -> None:
    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(SimulationError, match=f"cpus_per_client = {too_many}"):
        backend_config(load_scenario("tiny", [f"simulation.cpus_per_client={too_many}"]))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SimulationError, match="no CUDA GPU is visible"):
            backend_config(load_scenario("tiny", ["simulation.gpus_per_client=0.5"]))


def test_more_natural_clients_than_the_data_has_fails_in_preflight() -> None:
    with pytest.raises(Exception, match=r"only \d+ roles have >= 64 lines"):
        preflight(load_scenario("tiny", ["data.num_clients=1000"]))
