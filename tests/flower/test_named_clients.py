"""Deployed clients are known by name: partitions follow the sorted names, a client that
comes back under its name takes its old place, one more than data.num_clients is ignored,
and a declared device profile sets that client's settings."""

from fedtune.config import load_scenario
from fedtune.flower.strategy import FedtuneStrategy
from fedtune.planning.profiles import profile_path

SCENARIO = load_scenario("tiny", ["data.num_clients=3", "federation.aggregator='zeropad'"])


def test_partitions_follow_names_and_a_returning_client_keeps_its_place():
    strategy = FedtuneStrategy(SCENARIO)
    strategy._register_named({11: ("carol", ""), 12: ("alice", ""), 13: ("bob", "")})
    assert strategy.names == {"alice": 0, "bob": 1, "carol": 2}
    assert strategy.node_partition == {12: 0, 13: 1, 11: 2}
    strategy._register_named({99: ("bob", ""), 100: ("mallory", "")})
    assert strategy.node_partition == {12: 0, 99: 1, 11: 2}  # old node 13 replaced
    assert "mallory" not in strategy.names


def test_declared_profile_sets_that_clients_settings_and_survives_a_checkpoint():
    strategy = FedtuneStrategy(SCENARIO)
    profile = profile_path("cpu-box-16gb").read_text()
    strategy._register_named({1: ("a", ""), 2: ("b", profile), 3: ("c", "")})
    assert [s.profile for s in strategy.settings] == ["", "cpu-box-16gb", ""]
    assert strategy.settings[1].rank == 8 and strategy.settings[1].quantization == "4bit"
    assert strategy.settings[0].rank == SCENARIO.lora.rank
    restored = FedtuneStrategy(SCENARIO)
    restored.load_state_dict(strategy.state_dict())
    assert restored.settings == strategy.settings
    assert restored.names == strategy.names and restored.node_partition == {}


def _profile(**fields: object) -> str:
    import tomli_w

    return tomli_w.dumps({"name": "declared", "memory_budget_mb": 4000, "device": "cpu",
                          "quantization": "none", **fields})


def test_a_declared_profile_the_aggregator_cannot_serve_falls_back_and_the_run_goes_on():
    fedavg = load_scenario("tiny", ["data.num_clients=3"])  # one rank for every client
    strategy = FedtuneStrategy(fedavg)
    strategy._register_named({1: ("a", _profile(rank=16)), 2: ("b", "rank = 'not toml"),
                              3: ("c", _profile(rank="auto"))})
    assert [s.rank for s in strategy.settings] == [fedavg.lora.rank] * 3
    assert [s.profile for s in strategy.settings] == ["", "", "declared"]  # auto -> r
    assert set(strategy.declared) == {2}


def test_with_mixed_ranks_allowed_a_declared_auto_rank_is_planned():
    strategy = FedtuneStrategy(SCENARIO)  # zeropad serves mixed ranks
    strategy._register_named({1: ("a", _profile(rank="auto")), 2: ("b", ""), 3: ("c", "")})
    assert strategy.settings[0].rank > SCENARIO.lora.rank
