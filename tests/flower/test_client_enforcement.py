"""What a client enforces itself, checked on the real messages of in-process federations
(the real strategy, the real ClientApp, every reply captured as the node sent it): a
client with a privacy floor refuses a weaker run and the round goes on without it;
under client-level DP no reply carries a number about the client's data."""

import logging

import pytest
import torch
from flwr.app import Message

from fedtune.config import load_scenario
from fedtune.flower import messages as keys
from fedtune.flower.client_app import DP_REPLY_METRICS, make_client_app, train_session
from fedtune.flower.inprocess_grid import InProcessGrid
from fedtune.flower.server_app import run_federation
from fedtune.planning.client_settings import client_settings


def _federate(scenario, tmp_path, node_configs=None, heard=None
              ) -> list[tuple[str, Message]]:
    """Run ``scenario`` on the in-process Grid; every (message type, reply) a node sent
    (and, in ``heard``, every event the nodes' listener heard)."""
    sink = [] if heard is None else heard
    app = make_client_app(scenario, lambda *event: sink.append(event))
    sent: list[tuple[str, Message]] = []

    def recording(message: Message, context) -> Message:
        reply = app(message, context)
        sent.append((message.metadata.message_type, reply))
        return reply

    with InProcessGrid(recording, scenario.data.num_clients, node_configs=node_configs) as grid:
        run_federation(grid, scenario, tmp_path / "run")
    return sent


CENTRAL = ["run.rounds=1", 'privacy.mode="central"', "privacy.noise_multiplier=1.0",
           "privacy.clip_norm=0.5", "train.steps=2"]


def test_a_floored_client_refuses_a_weaker_run_and_the_round_goes_on(tmp_path, caplog):
    """Client 0 wants z >= 3; the run declares z = 1. It answers every train message
    with a refusal naming the setting; the others train and the run completes. The run
    opted into un-noised evaluation: client 0 refuses that too, the others answer."""
    scenario = load_scenario("tiny", [*CENTRAL, "privacy.federated_eval=true"])
    floors = [{"min-noise-multiplier": 3.0}, {}, {}, {}]
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        sent = _federate(scenario, tmp_path, floors)
    train = [reply for kind, reply in sent if kind == "train"]
    refusals = [r for r in train if r.has_error()]
    assert refusals, "client 0 was never sampled: the test proves nothing"
    for reply in refusals:
        assert reply.error.reason == ("client 0 refuses to train: noise multiplier 1 is "
                                      "below the floor 3")
    assert len(train) - len(refusals) >= 2  # the others trained
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    evaluate = [reply for kind, reply in sent if kind == "evaluate"]
    refused = [r.error.reason for r in evaluate if r.has_error()]
    assert refused and all(r.startswith("client 0 refuses to evaluate:") for r in refused)
    assert len(evaluate) > len(refused)  # the floorless clients opted in with the run
    assert "client 0 refuses to train: noise multiplier 1 is below the floor 3" in caplog.text
    server = [r.getMessage() for r in caplog.records  # the client logs it, the server
              if r.name == "fedtune" and not r.pathname.endswith("client_app.py")]
    assert any("dropped a reply" in m for m in server)  # counts it, under DP without
    assert not any("client 0 refuses" in m for m in server)  # the reason (it names it)


@pytest.mark.parametrize("overrides", [
    CENTRAL,
    ["run.rounds=1", 'federation.aggregator="ffa"', 'privacy.mode="distributed"',
     "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5", "train.steps=2",
     "compression.upload_density=0.5", "privacy.sample_noise_multiplier=1.0"],
], ids=["central", "distributed+compressed+dpsgd"])
def test_under_client_level_dp_no_reply_carries_a_number_about_the_data(tmp_path, overrides):
    """Every train reply's metrics are the partition id (and where Ray ran it) only: no
    loss, example count, memory, timing or norm; no evaluation numbers at all. The
    device's own listener still hears its loss (it never leaves)."""
    scenario = load_scenario("tiny", overrides)
    heard = []
    sent = _federate(scenario, tmp_path, heard=heard)
    assert all(keys.TRAIN_LOSS in details for kind, _, details in heard if kind == "train")
    assert any(kind == "train" for kind, _, _ in heard)
    train = [reply for kind, reply in sent if kind == "train" and not reply.has_error()]
    assert len(train) == scenario.data.num_clients
    for reply in train:
        metrics = dict(reply.content.metric_records[keys.METRICS])
        assert set(metrics) <= DP_REPLY_METRICS
        assert set(reply.content) == {keys.ADAPTER, keys.METRICS}
    for kind, reply in sent:
        if kind == "evaluate" and not reply.has_error():
            pytest.fail(f"an evaluation reply left a client under DP: {reply.content}")


def test_without_dp_replies_keep_their_metrics(tmp_path):
    """The control: the same federation without DP reports loss and examples (so the
    test above would see them if the DP path let them through)."""
    scenario = load_scenario("tiny", ["run.rounds=1", "train.steps=2"])
    train = [r for kind, r in _federate(scenario, tmp_path) if kind == "train"]
    metrics = dict(train[0].content.metric_records[keys.METRICS])
    assert {keys.TRAIN_LOSS, keys.NUM_EXAMPLES} <= set(metrics)


def _message(scenario, settings, server_round=1):
    from flwr.app import MessageType

    from fedtune.core.seeds import round_seed

    config = {keys.ROUND: server_round, keys.SEED: round_seed(scenario.run.seed, server_round),
              keys.DP_CLIP: 0.5, keys.DP_NOISE_STD: 0.5, keys.DP_FIELDS: "A,B",
              **settings.to_config()}
    return Message(content=keys.make_content(None, config), dst_node_id=1,
                   message_type=MessageType.TRAIN)


@pytest.mark.parametrize(("reproducible", "same"), [(False, False), (True, True)])
def test_client_noise_comes_from_os_entropy_unless_the_run_is_reproducible(reproducible, same):
    """The same train message twice (same seed): under DP the noise share differs,
    unless the scenario declares a reproducible experiment run."""
    scenario = load_scenario("tiny", [
        'privacy.mode="distributed"', "privacy.noise_multiplier=1.0",
        f"privacy.reproducible={str(reproducible).lower()}"])
    settings = client_settings(scenario)[0]
    first, second = (train_session(scenario, settings, _message(scenario, settings))
                     for _ in range(2))
    assert first.orders.client_dp.reproducible is reproducible
    assert first.orders.reproducible is reproducible
    start = {k: torch.zeros(2, 3) for k in ("m.lora_A.weight",)}
    from fedtune.train.upload import privatize

    a, _ = privatize(start, start, first.orders.client_dp, first.seed)
    b, _ = privatize(start, start, second.orders.client_dp, second.seed)
    assert first.seed == second.seed
    assert torch.equal(a["m.lora_A.weight"], b["m.lora_A.weight"]) is same


DISTRIBUTED = ['privacy.mode="distributed"', "privacy.noise_multiplier=2.0",
               "privacy.clip_norm=0.5", "privacy.min_clients=4"]


@pytest.mark.parametrize(("config", "reason"), [
    ({keys.DP_CLIP: 0.5, keys.DP_NOISE_STD: 0.5}, None),  # z C / sqrt(4) = 0.5
    ({keys.DP_CLIP: 0.5, keys.DP_NOISE_STD: 0.25}, "noise share of std 0.25, less than the 0.5"),
    ({keys.DP_CLIP: 2.0, keys.DP_NOISE_STD: 0.5}, "clip norm 2, more than the 0.5"),
    ({}, "asks for no noise share"),
])
def test_a_distributed_message_must_ask_for_what_the_run_declares(config, reason):
    """Floor or not: a server that sends less noise or a larger clip than its scenario
    declares (the run config every node holds) is refused."""
    from fedtune.flower.client_app import train_refusal
    from fedtune.privacy.floor import PrivacyFloor

    got = train_refusal(load_scenario("tiny", DISTRIBUTED), config, PrivacyFloor())
    assert (got is None) if reason is None else (reason in got)


def test_the_declared_dp_is_the_scenarios():
    """z planned for the target, epsilon the budget: what a floor is compared with."""
    from fedtune.flower.client_app import declared_dp

    scenario = load_scenario("tiny", ['privacy.mode="central"', "privacy.target_epsilon=8"])
    declared = declared_dp(scenario, {})
    assert declared.mode == "central"
    assert declared.noise_multiplier == scenario.privacy_plan().noise_multiplier
    assert declared.epsilon == 8.0
    assert declared_dp(load_scenario("tiny"), {}).mode == "none"
