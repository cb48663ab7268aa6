"""A client's privacy floor: which declared DP it refuses and why, where the floor comes
from (node config, device profile, simulated profile), and how it travels."""

import math

import pytest
from flwr.app import Context, RecordDict

from fedtune.deploy.client import ClientOptions, node_config
from fedtune.flower.client_app import DATA_PATH, PROFILE, own_floor
from fedtune.planning.client_settings import ClientSettings
from fedtune.planning.profiles import DeviceProfile, ProfileError
from fedtune.privacy.floor import DPRequest, PrivacyFloor, PrivacyFloorError, refusal

CENTRAL = DPRequest(mode="central", clip_norm=1.0, noise_multiplier=1.0, epsilon=8.0)


@pytest.mark.parametrize(("floor", "request_", "reason"), [
    (PrivacyFloor(), DPRequest(), None),  # no floor: anything goes
    (PrivacyFloor(min_noise_multiplier=1.0), CENTRAL, None),
    (PrivacyFloor(min_noise_multiplier=1.5), CENTRAL, "noise multiplier 1 is below the floor 1.5"),
    (PrivacyFloor(max_clip_norm=0.5), CENTRAL, "clip norm 1 is above the floor's maximum 0.5"),
    (PrivacyFloor(max_epsilon=4.0), CENTRAL, "epsilon 8 is above the floor's maximum 4"),
    (PrivacyFloor(max_epsilon=4.0), DPRequest(mode="central", clip_norm=1.0,
                                              noise_multiplier=1.0, epsilon=math.inf),
     "epsilon inf is above the floor's maximum 4"),
    (PrivacyFloor(min_noise_multiplier=0.1), DPRequest(), "the round has no client-level DP"),
    (PrivacyFloor(max_epsilon=100.0), DPRequest(mode="central", clip_norm=1.0,
                                                noise_multiplier=1.0, epsilon=1.0,
                                                reproducible=True),
     "reproducible experiment"),
])
def test_refusal(floor, request_, reason):
    got = refusal(floor, request_)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_a_distributed_share_is_held_to_the_floor_as_the_server_sees_it():
    """z = 2 declared, 4 shares of std z C / 2 each: without secure aggregation the server
    sees one share (multiplier 1 < 1.5: refused); with it, sums of 4 (2 >= 1.5: trains)."""
    share = dict(mode="distributed", clip_norm=0.5, noise_multiplier=2.0, epsilon=1.0,
                 share_std=2.0 * 0.5 / 2, min_clients=4)
    floor = PrivacyFloor(min_noise_multiplier=1.5)
    assert "own share" in refusal(floor, DPRequest(**share))
    assert refusal(floor, DPRequest(**share, secure_aggregation=True)) is None


def test_the_strictest_of_two_floors_holds():
    both = PrivacyFloor(1.0, 0.0, 8.0).strictest(PrivacyFloor(2.0, 0.5, 0.0))
    assert both == PrivacyFloor(2.0, 0.5, 8.0)


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, True])
def test_a_bad_floor_is_refused_with_its_name(value):
    with pytest.raises(PrivacyFloorError, match="max_epsilon"):
        PrivacyFloor(max_epsilon=value)


def test_the_floor_travels_in_the_node_config_and_back():
    floor = PrivacyFloor(min_noise_multiplier=2.0, max_epsilon=8.0)
    text = node_config(ClientOptions(server="h:1", data="/tmp/a.txt", privacy_floor=floor))
    assert "min-noise-multiplier=2.0" in text and "max-epsilon=8.0" in text
    assert "max-clip-norm" not in text
    assert PrivacyFloor.from_node_config(floor.node_config()) == floor


def _settings(**floor):
    return ClientSettings(partition=0, profile="p", rank=4, alpha=8.0, quantization="none",
                          batch_size=2, seq_len=16, **floor)


def test_a_simulated_client_holds_its_profile_and_node_floors():
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0,
                                                        "max-clip-norm": 0.5},
                      state=RecordDict(), run_config={})
    assert own_floor(context, _settings(min_noise_multiplier=1.0)) == PrivacyFloor(1.0, 0.5)


def test_a_deployed_client_reads_its_own_profile_not_the_servers_settings(tmp_path):
    profile = tmp_path / "phone.toml"
    profile.write_text('name = "phone"\nmemory_budget_mb = 4000\ndevice = "cpu"\n'
                       "min_noise_multiplier = 1.2\n")
    context = Context(run_id=1, node_id=1, node_config={DATA_PATH: "x", PROFILE: str(profile)},
                      state=RecordDict(), run_config={})
    # the settings a server sent carry no floor: the client's own file decides
    assert own_floor(context, _settings()) == PrivacyFloor(min_noise_multiplier=1.2)


def test_a_profile_floor_key_is_validated():
    base = {"name": "p", "memory_budget_mb": 1000, "device": "cpu"}
    assert DeviceProfile.from_dict({**base, "max_epsilon": 4}).privacy_floor.max_epsilon == 4
    with pytest.raises(ProfileError, match="min_noise_multiplier = -1"):
        DeviceProfile.from_dict({**base, "min_noise_multiplier": -1})


def test_fedtune_client_takes_its_floor_from_the_command_line(monkeypatch):
    from typer.testing import CliRunner

    from fedtune.cli import app

    seen = []
    monkeypatch.setattr("fedtune.deploy.client.run_client",
                        lambda options, say=None, stop=None: seen.append(options) or 0)
    base = ["client", "--server", "h:1", "--data", "x.txt", "--insecure"]
    result = CliRunner().invoke(app, [*base, "--min-noise-multiplier", "1.5",
                                      "--max-epsilon", "8"])
    assert result.exit_code == 0, result.output
    assert seen[0].privacy_floor == PrivacyFloor(min_noise_multiplier=1.5, max_epsilon=8.0)
    refused = CliRunner().invoke(app, [*base, "--max-clip-norm", "-1"])
    assert refused.exit_code == 2 and "max_clip_norm" in refused.output


def test_own_epsilon_charges_each_round_trained_without_subsampling():
    """What a client can vouch for whatever the server's sampling: its participations as
    whole Gaussian releases composed by the run's accountant, at the noise it can see."""
    from fedtune.privacy.accountant import epsilon_after
    from fedtune.privacy.floor import own_epsilon

    assert own_epsilon(CENTRAL, 3, 1e-5) == epsilon_after([(1.0, 1.0, 3)], 1e-5)
    assert own_epsilon(CENTRAL, 2, 1e-5) < own_epsilon(CENTRAL, 3, 1e-5)
    shared = DPRequest(mode="distributed", clip_norm=1.0, noise_multiplier=2.0, share_std=1.0,
                       min_clients=4)  # the server sees z = 1 on this client's share
    assert own_epsilon(shared, 3, 1e-5) == epsilon_after([(1.0, 1.0, 3)], 1e-5)


def test_a_floored_client_refuses_the_round_that_would_spend_past_its_maximum():
    """z = 1, delta = 1e-5: rounds 1 and 2 cost 4.7 and 7.1, the third 9.0 > 8. The run's
    own declared epsilon (with its subsampling) is within the floor: only the client's
    count refuses; without the floor nothing does."""
    from fedtune.config import load_scenario
    from fedtune.flower.client_app import train_refusal
    from fedtune.flower.orders import scenario_orders

    scenario = load_scenario("tiny", ['privacy.mode="central"', "privacy.noise_multiplier=1.0",
                                      "run.rounds=5", "federation.clients_per_round=1",
                                      "federation.min_clients=1", "privacy.min_clients=1"])
    orders = scenario_orders(scenario)
    floor = PrivacyFloor(max_epsilon=8.0)
    assert scenario.privacy_plan().planned_epsilon < 8.0
    assert train_refusal(scenario, orders, floor, trained=1) is None
    reason = train_refusal(scenario, orders, floor, trained=2)
    assert reason == ("its own epsilon would be 9.01 after 3 rounds (each charged without "
                      "subsampling), above the floor's maximum 8")
    assert train_refusal(scenario, orders, PrivacyFloor(), trained=4) is None
    assert "run.rounds = 5" in train_refusal(scenario, orders, PrivacyFloor(), trained=5)
