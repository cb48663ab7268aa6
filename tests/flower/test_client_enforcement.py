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


@pytest.mark.parametrize(("asked", "reason"), [
    ({}, None),  # z C / sqrt(4) = 0.5, as the scenario orders
    ({keys.DP_NOISE_STD: 0.25}, "asks for dp-noise-std = 0.25; the run's sealed scenario "
                                "orders dp-noise-std = 0.5"),
    ({keys.DP_NOISE_STD: 1.0}, "asks for dp-noise-std = 1.0"),  # more is not asked for either
    ({keys.DP_CLIP: 2.0}, "asks for dp-clip-norm = 2.0; the run's sealed scenario orders "
                          "dp-clip-norm = 0.5"),
    ({keys.DP_NOISE_STD: None}, "does not set dp-noise-std"),
])
def test_a_distributed_message_must_ask_for_what_the_run_declares(asked, reason):
    """Floor or not: a server that sends another noise share or clip than its scenario
    orders (the run config every node holds) is refused, the setting named."""
    from fedtune.flower.client_app import train_refusal
    from fedtune.flower.orders import scenario_orders
    from fedtune.privacy.floor import PrivacyFloor

    scenario = load_scenario("tiny", DISTRIBUTED)
    config = {k: v for k, v in {**scenario_orders(scenario), **asked}.items() if v is not None}
    got = train_refusal(scenario, config, PrivacyFloor())
    assert (got is None) if reason is None else (reason in got), got


def test_the_declared_dp_is_the_scenarios():
    """z planned for the target, epsilon the budget: what a floor is compared with."""
    from fedtune.flower.client_app import declared_dp

    scenario = load_scenario("tiny", ['privacy.mode="central"', "privacy.target_epsilon=8"])
    declared = declared_dp(scenario)
    assert declared.mode == "central"
    assert declared.noise_multiplier == scenario.privacy_plan().noise_multiplier
    assert declared.epsilon == 8.0
    assert declared_dp(load_scenario("tiny")).mode == "none"


#: the sealed scenario the malicious server attacks: fedavg (A and B trained), distributed
#: client-level DP and DP-SGD, two rounds
SEALED = ["run.rounds=2", 'privacy.mode="distributed"', "privacy.noise_multiplier=1.0",
          "privacy.clip_norm=0.05", "privacy.min_clients=2", "privacy.sample_noise_multiplier=1.0",
          "train.steps=2"]
#: ... and sealed with secure aggregation (the threshold attack needs it)
SEALED_SECURE = [*SEALED, "privacy.secure_aggregation=true"]
#: what each attack of ``evil_server.ATTACKS`` must be refused with (None: it trains)
REFUSED = {"honest": None,
           "dp-fields = B": "dp-fields = 'B'; the run's sealed scenario orders dp-fields = 'A,B'",
           "freeze A": "freeze-a = True; the run's sealed scenario orders freeze-a = False",
           "no DP-SGD keys": "does not set dpsgd-noise-multiplier; the run's sealed scenario "
                             "orders dpsgd-noise-multiplier = 1.0",
           "weaker z": "dpsgd-noise-multiplier = 0.01; the run's sealed scenario orders "
                       "dpsgd-noise-multiplier = 1.0",
           "weaker delta": "dpsgd-delta = 0.5; the run's sealed scenario orders dpsgd-delta",
           "smaller noise share": "dp-noise-std = 1e-06",
           "sparse upload": "upload-density = 0.01",
           "threshold 1": "privacy.secagg_threshold = 1 is below 2",
           "larger batch": "client.batch_size = 64; the run's sealed scenario orders "
                           "client.batch_size = ",  # the scenario's (8 tiny, 4 deployed)
           "shorter sequences": "client.seq_len = 8; the run's sealed scenario orders "
                                "client.seq_len = 32",
           "larger rank": "client.rank = 8; the run's sealed scenario orders client.rank = 4",
           "larger alpha": "client.alpha = 80.0; the run's sealed scenario orders "
                           "client.alpha = 8.0",
           "other quantization": "client.quantization = 'nf4'; the run's sealed scenario "
                                 "orders client.quantization = 'none'",
           "more steps": "sets train.steps = 1000, which the run's sealed scenario does not "
                         "order",
           "larger lr": "sets train.lr = 1.0, which the run's sealed scenario does not order",
           "past run.rounds": "it has trained 2 times in this run, the sealed run.rounds = 2"}


def check_attacked(captured, names=None, secure=False):
    """Each attack (of ``names``, or all) refused with its setting named, the honest
    rounds trained, and what they sent back: the noised update, no number about the data
    (under secure aggregation: the train stage's two public keys, no update at all)."""
    from tests.flower.evil_server import played

    assert [c["attack"] for c in captured] == played(names, secure)
    share = 1.0 * 0.05 / 2 ** 0.5  # z C / sqrt(min_clients)
    for got in captured:
        want = REFUSED[got["attack"]]
        if want is None:
            assert "refused" not in got, got
            assert set(got["metrics"]) <= DP_REPLY_METRICS, got["metrics"]
            if secure:
                assert set(got["records"]) == {"secagg", keys.METRICS}, got["records"]
                assert got["secagg"] == ["pk1", "pk2"], got["secagg"]
                continue
            assert set(got["records"]) == {keys.ADAPTER, keys.METRICS}
            # both factors carry this client's noise share: far more than the clip allows
            assert min(got["delta_norm"].values()) > 10 * share, got["delta_norm"]
        else:
            assert "metrics" not in got, got
            assert got["refused"].startswith("client "), got["refused"]
            assert " refuses to train: " in got["refused"], got["refused"]
            assert want in got["refused"], (want, got["refused"])


def test_a_malicious_server_is_refused_each_setting_the_scenario_does_not_order(tmp_path):
    """On the in-process Grid, the real ClientApp reading its scenario from the run
    config (as a deployed client does): ``evil_server`` asks for dp-fields = B, a frozen
    A, no DP-SGD, a weaker z, C and delta, a smaller noise share, a sparse upload, other
    client settings (batch size, sequence length, rank, alpha, quantization), steps and a
    learning rate of its own, and a train message past run.rounds. Each is refused, the
    setting named."""
    from tests.flower.evil_server import attack

    scenario = load_scenario("tiny", SEALED)
    with InProcessGrid(make_client_app(), scenario.data.num_clients,
                       run_config=scenario.to_flat()) as grid:
        captured = attack(grid, scenario)
    check_attacked(captured)
    assert all(c["refused"].startswith("client 0 refuses") for c in captured if "refused" in c)


def test_the_deployed_attacks_under_secure_aggregation_in_process(tmp_path):
    """What the real-process malicious server plays (``evil_server.DEPLOYED``, a run
    sealed with secure aggregation, the threshold 1 attack included), on the in-process
    Grid: the same refusals, and the honest train stages answered with two keys only."""
    from tests.flower.evil_server import DEPLOYED, attack

    scenario = load_scenario("tiny", [*SEALED_SECURE, "data.num_clients=2"])
    with InProcessGrid(make_client_app(), scenario.data.num_clients,
                       run_config=scenario.to_flat()) as grid:
        captured = attack(grid, scenario, DEPLOYED)
    check_attacked(captured, DEPLOYED, secure=True)


def test_under_dpsgd_alone_a_reply_carries_the_update_and_the_expected_count(tmp_path):
    """Sample-level DP without client-level DP: no loss, timing or memory leaves; the
    example count is steps x batch whatever the data; the server takes the replies and
    the round is released."""
    scenario = load_scenario("tiny", ["run.rounds=1", "train.steps=2", "train.batch_size=3",
                                      "privacy.sample_noise_multiplier=1.0"])
    sent = _federate(scenario, tmp_path)
    train = [reply for kind, reply in sent if kind == "train"]
    assert train and not any(r.has_error() for r in train)
    for reply in train:
        metrics = dict(reply.content.metric_records[keys.METRICS])
        assert set(metrics) == {keys.PARTITION, keys.NUM_EXAMPLES, keys.SAMPLE_EPSILON}
        assert metrics[keys.NUM_EXAMPLES] == 2 * 3
    import json

    rounds = json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"]
    assert rounds[0]["clients_replied"] == len(train)
    assert rounds[0]["train_loss"] is None
    # the epsilon each client reports is Google's dp-accounting's for what it ran: the
    # sealed steps of Poisson-sampled Gaussian updates, q = its batch / its own blocks
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from fedtune.train.batches import client_batch

    for reply in train:
        metrics = dict(reply.content.metric_records[keys.METRICS])
        blocks = client_batch(scenario, int(metrics[keys.PARTITION])).train.input_ids.shape[0]
        accountant = RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            min(1.0, 3 / blocks), dp_accounting.GaussianDpEvent(1.0)), 2))
        assert metrics[keys.SAMPLE_EPSILON] == pytest.approx(
            accountant.get_epsilon(scenario.privacy.delta), rel=1e-2)


def test_under_secure_aggregation_the_record_must_be_what_the_scenario_orders():
    """A sealed SecAgg + distributed DP run: a message without secure aggregation (the
    share would reach the server alone), or whose record asks for noise-std 0 (the client
    would clip its noised update, scaling its noise down to C) or other bits, is refused;
    the honest record is answered with the two public keys only."""
    import dataclasses

    from flwr.app import ConfigRecord

    from fedtune.flower import secagg
    from fedtune.flower.strategy import FedtuneStrategy

    scenario = load_scenario("tiny", [
        "run.rounds=2", 'privacy.mode="distributed"', "privacy.noise_multiplier=1.0",
        "privacy.clip_norm=0.5", "privacy.min_clients=2", "privacy.secure_aggregation=true",
        "train.steps=1"])
    strategy = FedtuneStrategy(scenario)
    with InProcessGrid(make_client_app(), scenario.data.num_clients,
                       run_config=scenario.to_flat()) as grid:
        strategy.discover(grid)
        node = sorted(strategy.node_partition)[0]
        honest = dataclasses.replace(secagg.round_settings(
            strategy, strategy._train_messages([node], 1)), threshold=2)
        attacks = {"honest": honest.to_config(), "no secure aggregation": None,
                   "noise-std 0": dataclasses.replace(honest, noise_std=0.0).to_config(),
                   "bits 8": dataclasses.replace(honest, bits=8).to_config()}
        got = {}
        for name, record in attacks.items():
            message = strategy._train_messages([node], 1)[0]
            if record is not None:
                message.content[secagg.SECAGG] = ConfigRecord(record)
            got[name] = grid.send_and_receive([message], timeout=300)[0]
    keyed = got.pop("honest")
    assert not keyed.has_error(), keyed.error
    assert set(keyed.content.config_records[secagg.SECAGG]) == {"pk1", "pk2"}
    assert keys.ADAPTER not in keyed.content
    assert set(keyed.content.metric_records[keys.METRICS]) <= DP_REPLY_METRICS
    reasons = {name: reply.error.reason for name, reply in got.items()}
    assert "asks for no secure aggregation" in reasons["no secure aggregation"]
    assert "noise-std = 0.0; the run's sealed scenario orders noise-std = 0.35" in \
        reasons["noise-std 0"]
    assert "bits = 8" in reasons["bits 8"]


def test_the_1001st_train_message_of_a_1000_round_run_is_refused():
    """The count lives in the node's state (as Flower keeps it per run on a SuperNode):
    a node that has trained 1,000 times refuses the next train message of a run sealed at
    1,000 rounds, and a node that has trained 999 times takes it."""
    from flwr.app import ConfigRecord

    from fedtune.flower.client_app import TRAINED
    from fedtune.flower.strategy import FedtuneStrategy

    scenario = load_scenario("tiny", ["run.rounds=1000", *CENTRAL[1:]])
    strategy = FedtuneStrategy(scenario)
    with InProcessGrid(make_client_app(), scenario.data.num_clients,
                       run_config=scenario.to_flat()) as grid:
        strategy.discover(grid)
        first, second = sorted(strategy.node_partition)[:2]
        grid.contexts[first].state[TRAINED] = ConfigRecord({"count": 1000})
        grid.contexts[second].state[TRAINED] = ConfigRecord({"count": 999})
        refused, trained = grid.send_and_receive(
            strategy._train_messages([first, second], 1000), timeout=300)
        again = grid.send_and_receive(strategy._train_messages([second], 1000), timeout=300)[0]
    assert refused.error.reason.endswith(
        "refuses to train: it has trained 1000 times in this run, the sealed run.rounds = 1000")
    assert not trained.has_error()
    assert again.error.reason.endswith("it has trained 1000 times in this run, the sealed "
                                       "run.rounds = 1000")


def test_a_deployed_client_with_a_profile_takes_the_servers_resolution_only(tmp_path):
    """Deployed clients (named, own data files; the first declares the phone profile) on
    the in-process Grid with the real strategy: the server resolves the profile (here at
    the federation's fixed rank, fedavg needing one rank) and the client trains with
    that; a message asking it for another batch size than its own profile's is refused,
    naming the profile; and so is one for a client without a profile."""
    from flwr.app import ConfigRecord

    from fedtune.flower.strategy import FedtuneStrategy
    from tests.deploy.harness import client_files

    scenario = load_scenario("tiny", ["run.rounds=2", "train.steps=1", "data.num_clients=3"])
    files = client_files(tmp_path / "data", 3)
    configs = [{"name": f"c{i}", "data-path": str(f), "profile": "phone-class-4gb" if i == 0
                else ""} for i, f in enumerate(files)]
    strategy = FedtuneStrategy(scenario)
    with InProcessGrid(make_client_app(scenario), 3, node_configs=configs) as grid:
        strategy.discover(grid)
        phone, plain = (next(n for n, p in strategy.node_partition.items() if p == i)
                        for i in (0, 1))
        honest = strategy._train_messages([phone, plain], 1)
        replies = grid.send_and_receive(honest, timeout=300)
        attacked = []
        for node in (phone, plain):
            message = strategy._train_messages([node], 2)[0]
            config = dict(message.content.config_records[keys.CONFIG])
            config["client.batch_size"] = 64
            message.content[keys.CONFIG] = ConfigRecord(config)
            attacked.append(grid.send_and_receive([message], timeout=300)[0])
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies
                                                     if r.has_error()]
    settings = strategy.population.settings_for(phone)
    assert (settings.profile, settings.batch_size, settings.rank) == ("phone-class-4gb", 1, 4)
    assert attacked[0].error.reason == (
        "client 'c0' refuses to train: the message asks for client.batch_size = 64; the "
        "run's sealed scenario and this client's profile order client.batch_size = 1")
    assert attacked[1].error.reason == (
        "client 'c1' refuses to train: the message asks for client.batch_size = 64; the "
        "run's sealed scenario orders client.batch_size = 8")
