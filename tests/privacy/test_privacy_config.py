"""Bad privacy input and forbidden combinations fail before any work, naming the key."""

import pytest

from fedtune.config import ConfigError, load_scenario
from fedtune.privacy.accountant import epsilon_after

CENTRAL = ['privacy.mode="central"', "privacy.noise_multiplier=1.0"]


@pytest.mark.parametrize("overrides,message", [
    (["privacy.clip_norm=0"], "clip_norm = 0.0"),
    (["privacy.clip_norm=-1"], "clip_norm = -1.0"),
    (["privacy.delta=0"], "delta = 0.0"),
    (["privacy.delta=1"], "delta = 1.0"),
    (['privacy.mode="local"'], "mode = 'local'"),
    (['privacy.mode="central"'], "clipping without noise is not differential privacy"),
    ([*CENTRAL, "privacy.target_epsilon=3"], "one or the other"),
    (['privacy.mode="central"', "privacy.target_epsilon=0.00001"], "unreachable"),
    ([*CENTRAL, "privacy.min_clients=5"], "min_clients = 5 exceeds the 4 clients"),
    ([*CENTRAL, 'federation.aggregator="hetlora"'], "depend on the updates themselves"),
    ([*CENTRAL, 'federation.aggregator="fedsb"'], "only R (r x r) needs noise"),
    ([*CENTRAL, "privacy.delta=0.25"], "below 1 / data.num_clients = 0.25"),
    ([*CENTRAL, 'federation.merge="ties"'], "merge = 'mean'"),
    ([*CENTRAL, 'federation.aggregator="zeropad"', 'federation.padding="skip"'],
     "padding = 'zeros'"),
    (['privacy.mode="distributed"', "privacy.noise_multiplier=1", 'federation.aggregator="flora"'],
     "only the server forms"),
    (["privacy.secure_aggregation=true", 'federation.aggregator="flora"'],
     "need each client's own factors"),
    (["privacy.secure_aggregation=true", 'federation.aggregator="flexlora"'],
     "need each client's own factors"),
    (["privacy.secure_aggregation=true", 'federation.aggregator="ffa"', *CENTRAL],
     "never sees"),
    (['privacy.mode="central"', "privacy.noise_multiplier=0.3", "privacy.max_epsilon=2"],
     "rounds fit the budget"),
    (["privacy.sample_clip_norm=0"], "sample_clip_norm"),
])
def test_bad_privacy_configuration_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_scenario("tiny", overrides)


def test_target_epsilon_plan_comes_from_the_accountant():
    s = load_scenario("tiny", ['privacy.mode="central"', "privacy.target_epsilon=4",
                               "run.rounds=3", "federation.clients_per_round=2"])
    plan = s.privacy_plan()
    assert plan.sample_rate == 0.5
    assert plan.planned_epsilon == epsilon_after([(plan.noise_multiplier, 0.5, 3)], 1e-5)
    assert 3.8 < plan.planned_epsilon <= 4.0


def test_budget_stop_is_allowed_to_plan_past_the_budget():
    s = load_scenario("tiny", [*CENTRAL, "privacy.max_epsilon=2", 'privacy.on_budget="stop"'])
    assert s.privacy_plan().planned_epsilon > 2
