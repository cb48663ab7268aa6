"""What the strategy sends and what the client builds from it: the client's starting
model carries exactly the global update (scale conventions of every client mode)."""

import pytest
import torch

from fedtune.config import LoraSpec, load_scenario
from fedtune.core.adapters import ClientUpdate, LoraFactors
from fedtune.flower import messages as keys
from fedtune.flower.client_app import train_session
from fedtune.flower.strategy import FedtuneStrategy, RoundFailedError
from fedtune.model import cache
from fedtune.model.lora import adapter_state
from fedtune.planning.client_settings import ClientSettings


@pytest.fixture(autouse=True)
def _server_identity():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _updates(scenario, ranks, seed=0):
    model, _ = cache.get_peft_model(scenario.model, LoraSpec(rank=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for i, r in enumerate(ranks):
        factors = {}
        for key, value in adapter_state(model).items():
            if key.endswith(".lora_A.weight"):
                name = key.removesuffix(".lora_A.weight")
                out = adapter_state(model)[name + ".lora_B.weight"].shape[0]
                factors[name] = LoraFactors(A=torch.randn(r, value.shape[1], generator=gen),
                                            B=torch.randn(out, r, generator=gen) * 0.1,
                                            scale=2.0)
        updates.append(ClientUpdate(factors=factors, num_examples=10 + i, client_id=str(i)))
    return updates


def _effective_delta(model, module_name):
    """sum over active adapters of scaling * B @ A for one LoRA layer."""
    layer = dict(model.named_modules())[module_name]
    total = 0
    for name in layer.active_adapters:
        product = layer.lora_B[name].weight @ layer.lora_A[name].weight
        total = total + layer.scaling[name] * product
    return total


@pytest.mark.parametrize(("aggregator", "extra"), [
    ("flora", 'federation.flora_init="fresh"'),
    ("flora", 'federation.flora_init="global"'),
    ("zeropad", "lora.rank=4"),
    ("flexlora", "lora.rank=4"),
])
def test_client_starts_from_exactly_the_global_update(aggregator, extra):
    scenario = load_scenario("tiny", [f'federation.aggregator="{aggregator}"', extra,
                                      "lora.dropout=0.0"])
    strategy = FedtuneStrategy(scenario)
    strategy.node_partition = {100: 0}
    strategy.global_adapter = strategy.aggregator.aggregate(_updates(scenario, [4, 2]), None)
    message = strategy._train_messages([100], 2)[0]
    settings = ClientSettings.from_config(message.content.config_records[keys.CONFIG])
    model = train_session(scenario, settings, message).prepare()
    payload_for_rank = strategy.aggregator.payload_for(strategy.global_adapter, settings.rank,
                                                       scale=settings.alpha / settings.rank)
    for module, factors in strategy.global_adapter.factors.items():
        expected = (factors.delta() if aggregator == "flora"
                    else payload_for_rank[module].delta())
        got = _effective_delta(model, module)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_lower_rank_payload_fills_the_first_components_of_a_higher_rank_client():
    scenario = load_scenario("tiny", ['federation.aggregator="zeropad"', "lora.rank=8",
                                      "lora.alpha=16"])
    strategy = FedtuneStrategy(scenario)
    strategy.node_partition = {100: 0}
    strategy.global_adapter = strategy.aggregator.aggregate(_updates(scenario, [4, 2]), None)
    message = strategy._train_messages([100], 2)[0]
    payload = keys.record_to_state(message.content.array_records[keys.ADAPTER])
    assert {v.shape[0] for k, v in payload.items() if "lora_A" in k} == {4}
    settings = ClientSettings.from_config(message.content.config_records[keys.CONFIG])
    model = train_session(scenario, settings, message).prepare()
    state = adapter_state(model)
    for key, value in payload.items():
        head = state[key][:4] if "lora_A" in key else state[key][:, :4]
        assert torch.equal(head, value)
        if "lora_B" in key:
            assert torch.count_nonzero(state[key][:, 4:]) == 0


class _Connected:
    """What sampling asks of a Grid: which nodes are connected now."""

    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return list(self.node_ids)


def test_node_sampling_is_seeded_by_partition_not_by_node_id():
    scenario = load_scenario("tiny", ["federation.clients_per_round=2"])
    picks = []
    for node_ids in ([11, 22, 33, 44], [90, 10, 70, 30]):  # Flower's ids differ per run
        strategy = FedtuneStrategy(scenario)
        strategy.node_partition = {n: p for p, n in enumerate(node_ids)}
        strategy.discover = lambda grid: None  # nodes already identified above
        nodes = strategy._sample_nodes(_Connected(node_ids), 2)
        picks.append(sorted(strategy.node_partition[n] for n in nodes))
    assert picks[0] == picks[1]


def test_sampling_skips_nodes_that_are_gone_and_keeps_the_minimum():
    scenario = load_scenario("tiny", ["federation.min_clients=2"])
    strategy = FedtuneStrategy(scenario)
    strategy.node_partition = {11: 0, 22: 1, 33: 2, 44: 3}
    strategy.discover = lambda grid: None
    assert sorted(strategy._sample_nodes(_Connected([11, 33, 44]), 4)) == [11, 33, 44]
    with pytest.raises(RoundFailedError, match="fewer than federation.min_clients = 2"):
        strategy._sample_nodes(_Connected([22]), 4)


