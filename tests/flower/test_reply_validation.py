"""The strategy validates every reply before aggregation: bad ones are dropped with a
reason and the round goes on; too few good ones fail the round clearly. Real Flower
Message objects, real adapter tensors from the tiny model."""

import math

import pytest
import torch
from flwr.app import Message, MessageType

from fedtune.config import LoraSpec, load_scenario
from fedtune.flower import messages as keys
from fedtune.flower.strategy import FedtuneStrategy, RoundFailedError
from fedtune.model import cache
from fedtune.model.lora import adapter_state

SCENARIO = load_scenario("tiny", ["federation.min_clients=2"])


@pytest.fixture(autouse=True)
def _server_identity():
    """Flower stamps messages with the identity of the running task (as a ServerApp's
    process has); give this test process the one the simulation engine gives its own."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _good_state():
    model, _ = cache.get_peft_model(SCENARIO.model, LoraSpec(rank=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=gen) for k, v in adapter_state(model).items()}


def _strategy():
    strategy = FedtuneStrategy(SCENARIO)
    strategy.node_partition = {100 + i: i for i in range(4)}
    return strategy


def _reply(node, state, num_examples=10):
    sent = Message(content=keys.make_content(None, {keys.ROUND: 1}), dst_node_id=node,
                   message_type=MessageType.TRAIN)
    metrics = {keys.NUM_EXAMPLES: num_examples, keys.TRAIN_LOSS: 1.0, keys.PARTITION: 0}
    return keys.reply(sent, metrics, keys.state_to_record(state))


def _bad(kind):
    state = _good_state()
    key = next(k for k in state if "lora_A" in k)
    if kind == "nan":
        state[key] = state[key].clone()
        state[key][0, 0] = math.nan
    elif kind == "rank":
        state = {k: (v[:2] if "lora_A" in k else v[:, :2]) for k, v in state.items()}
    elif kind == "module":
        state = {k.replace("q_proj", "k_proj"): v for k, v in state.items()}
    elif kind == "shape":
        state = {k: (torch.zeros(v.shape[0], 7) if "lora_A" in k else v) for k, v in state.items()}
    elif kind == "lonely":
        state = {k: v for k, v in state.items() if k != key}
    return state


@pytest.mark.parametrize(("kind", "reason"), [
    ("nan", "non-finite"),
    ("rank", "instead of the assigned rank 4"),
    ("module", "module names differ"),
    ("shape", "expected"),
    ("lonely", "only one of lora_A / lora_B"),
])
def test_bad_reply_is_dropped_with_its_reason_and_the_round_goes_on(kind, reason):
    strategy = _strategy()
    replies = [_reply(100, _good_state()), _reply(101, _bad(kind)), _reply(102, _good_state())]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-clients"] == 2
    assert len(strategy.stats.dropped) == 1 and reason in strategy.stats.dropped[0]
    assert "node 101" in strategy.stats.dropped[0]
    assert strategy.global_adapter is not None and len(arrays) == len(_good_state())


def test_zero_examples_and_client_errors_are_dropped():
    strategy = _strategy()
    sent = Message(content=keys.make_content(None, {}), dst_node_id=103,
                   message_type=MessageType.TRAIN)
    from flwr.app import Error

    failed = Message(Error(code=0, reason="Exception occurred. Message: out of memory\n..."),
                     reply_to=sent)
    replies = [_reply(100, _good_state()), _reply(101, _good_state(), num_examples=0),
               _reply(102, _good_state()), failed]
    strategy.aggregate_train(1, replies)
    assert any("num-examples must be positive" in d for d in strategy.stats.dropped)
    assert any(d.endswith("client error: out of memory") for d in strategy.stats.dropped)


def test_too_few_valid_replies_fail_the_round_with_the_reasons():
    strategy = _strategy()
    with pytest.raises(RoundFailedError, match="1 valid replies.*min_clients = 2.*non-finite"):
        strategy.aggregate_train(1, [_reply(100, _good_state()), _reply(101, _bad("nan"))])


def test_aggregated_update_is_the_weighted_mean_of_the_valid_replies():
    strategy = _strategy()
    a, b = _good_state(), {k: v * 3 for k, v in _good_state().items()}
    strategy.aggregate_train(1, [_reply(100, a, 10), _reply(101, _bad("nan")),
                                 _reply(102, b, 30)])
    for module, factors in strategy.global_adapter.factors.items():
        expected_a = (10 * a[module + ".lora_A.weight"] + 30 * b[module + ".lora_A.weight"]) / 40
        torch.testing.assert_close(factors.A, expected_a)


def test_hetlora_self_pruned_reply_is_accepted_and_the_node_keeps_its_new_rank():
    scenario = load_scenario("tiny", ["federation.min_clients=2",
                                      'federation.aggregator="hetlora"',
                                      "federation.prune_gamma=0.5"])
    strategy = FedtuneStrategy(scenario)
    strategy.node_partition = {100 + i: i for i in range(4)}
    pruned = _bad("rank")  # every module at rank 2 instead of 4
    strategy.aggregate_train(1, [_reply(100, _good_state()), _reply(101, pruned)])
    assert strategy.stats.dropped == []
    assert strategy.pruned_rank == {1: 2}
    settings = strategy._settings(101)
    assert (settings.rank, settings.alpha) == (2, 4.0)  # alpha / r stays 2
    message = strategy._train_messages([101], 2)[0]
    config = message.content.config_records[keys.CONFIG]
    assert config["client.rank"] == 2 and config[keys.PRUNE_GAMMA] == 0.5
    payload = keys.record_to_state(message.content.array_records[keys.ADAPTER])
    assert {v.shape[0] for k, v in payload.items() if "lora_A" in k} == {2}


def test_client_prunes_only_a_weak_tail():
    from fedtune.train.upload import prune_rank

    state = _good_state()  # rank 4, components of similar strength: kept
    assert prune_rank(state, 2.0, 0.5) is state
    weak = {k: (v.clone() if "lora_A" in k else v.clone()) for k, v in state.items()}
    for key, value in weak.items():
        if "lora_B" in key:
            value[:, 2:] *= 1e-3  # components 3 and 4 nearly unused
    pruned = prune_rank(weak, 2.0, 0.5)
    assert {v.shape[0] for k, v in pruned.items() if "lora_A" in k} == {2}
    assert all(torch.equal(pruned[k], weak[k][:2] if "lora_A" in k else weak[k][:, :2])
               for k in pruned)


def test_prune_gamma_needs_hetlora():
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match="prune_gamma"):
        load_scenario("tiny", ["federation.prune_gamma=0.5"])


def test_update_beyond_max_update_norm_is_rejected_and_the_round_goes_on():
    """The norm is of the move from the start the server knows (the seeded init in
    round 1), so a reply 1e6 times too far is refused while normal ones pass."""
    from fedtune.config import load_scenario as load

    strategy = FedtuneStrategy(load("tiny", ["federation.min_clients=2",
                                             "federation.max_update_norm=100"]))
    strategy.node_partition = {100 + i: i for i in range(4)}
    far = {k: v * 1e6 for k, v in _good_state().items()}
    replies = [_reply(100, _good_state()), _reply(101, far), _reply(102, _good_state())]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-clients"] == 2
    assert len(strategy.stats.dropped) == 1
    assert "node 101" in strategy.stats.dropped[0]
    assert "exceeds federation.max_update_norm = 100" in strategy.stats.dropped[0]


def test_sampled_nodes_without_a_reply_are_counted_as_stragglers():
    strategy = _strategy()
    strategy.stats.nodes = [100, 101, 102, 103]
    replies = [_reply(100, _good_state()), _reply(102, _good_state())]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-clients"] == 2
    assert strategy.stats.stragglers == 2
    assert sorted(d.split(":")[0] for d in strategy.stats.dropped) == ["node 101", "node 103"]
    assert all("no reply within federation.round_timeout" in d for d in strategy.stats.dropped)
