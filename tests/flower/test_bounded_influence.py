"""Bounded influence by default, through the real strategy and real Flower messages: a
client that boosts its update or claims 10,000 times an honest client's examples pulls
the round's aggregate no further than a few honest clients, and the round's metrics
say which bound was used. With the bound switched off (the defaults before) it takes
the aggregate over."""

import functools

import pytest
import torch
from flwr.app import Message, MessageType

from fedtune.config import LoraSpec, load_scenario
from fedtune.flower import messages as keys
from fedtune.flower.strategy import FedtuneStrategy
from fedtune.model import cache
from fedtune.model.lora import adapter_state

OFF = ["federation.median_norm_multiple=0", "federation.median_weight_multiple=0"]


@pytest.fixture(autouse=True)
def _server_identity():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _strategy(*sets):
    strategy = FedtuneStrategy(load_scenario("tiny", ["federation.min_clients=2", *sets]))
    strategy.node_partition = {100 + i: i for i in range(4)}
    return strategy


@functools.lru_cache(maxsize=1)
def _start():
    """The round-1 start every client trains from (the shared seeded init)."""
    from fedtune.core.init import seeded_lora_state

    scenario = load_scenario("tiny")
    model, _ = cache.get_peft_model(scenario.model, LoraSpec(rank=4, alpha=8), seed=0)
    shapes = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    return seeded_lora_state(scenario.run.seed, shapes)


def _state(seed, boost=1.0):
    """An honest client's LoRA: the start moved by a small random step (x ``boost``)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + boost * 0.01 * torch.randn(v.shape, generator=gen)
            for k, v in _start().items()}


def _reply(node, state, num_examples=10):
    sent = Message(content=keys.make_content(None, {keys.ROUND: 1}), dst_node_id=node,
                   message_type=MessageType.TRAIN)
    metrics = {keys.NUM_EXAMPLES: num_examples, keys.TRAIN_LOSS: 1.0, keys.PARTITION: 0}
    return keys.reply(sent, metrics, keys.state_to_record(state))


def _b_of(strategy):
    return torch.cat([f.B.flatten() for _, f in sorted(strategy.global_adapter.factors.items())])


def _round(strategy, attacker_state, attacker_examples=10):
    honest = [_reply(100 + i, _state(i)) for i in range(3)]
    _, metrics = strategy.aggregate_train(1, [*honest, _reply(103, attacker_state,
                                                              attacker_examples)])
    return _b_of(strategy), metrics


def _clean():
    strategy = _strategy()
    strategy.aggregate_train(1, [_reply(100 + i, _state(i)) for i in range(3)])
    return _b_of(strategy)


def test_a_boosted_update_is_clipped_by_default_and_takes_over_without_the_bound():
    boosted = _state(9, boost=1000)
    clean = _clean()
    honest_size = clean.norm()
    bounded, metrics = _round(_strategy(), boosted)
    unbounded, _ = _round(_strategy(*OFF), boosted)
    assert metrics["influence-clipped"] == 1
    assert metrics["influence-norm-bound"] == pytest.approx(3 * metrics["influence-norm-median"])
    assert (bounded - clean).norm() < 2 * honest_size
    assert (unbounded - clean).norm() > 100 * honest_size


def test_an_inflated_example_count_is_capped_by_default():
    evil = _state(9)
    _, metrics = _round(_strategy(), evil, attacker_examples=100_000)
    assert metrics["influence-capped"] == 1
    assert metrics["influence-examples-cap"] == 40  # 4 x the median count, 10


def test_the_bound_is_on_in_every_bundled_scenario_or_dp_clips():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "simulations"
    names = sorted(p.stem for p in folder.glob("*.toml"))
    assert len(names) >= 7
    for name in names:
        scenario = load_scenario(name)
        bound = scenario.federation.influence_bound()
        assert bound.median_norm_multiple > 0 or scenario.privacy.client_level, name
        assert bound.median_weight_multiple > 0 or scenario.privacy.client_level, name
