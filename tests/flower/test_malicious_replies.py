"""A malicious client the federation admitted costs the server at most its own reply:
what a reply declares (shapes, element counts, examples) is held to what the server
knows itself before anything is allocated or weighted, and whatever exception one reply
causes drops that reply with its reason while the round goes on. Real Flower messages
and the real strategy, without a Grid (as in test_reply_validation)."""

import io
import resource
import struct

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.config import ConfigError, LoraSpec, load_scenario
from fedtune.core.compress import CompressionSpec, encode_indexed, encode_state, pack_records
from fedtune.flower import messages as keys
from fedtune.flower import replies
from fedtune.flower.strategy import FedtuneStrategy
from fedtune.model import cache
from fedtune.model.compat import describe_base
from fedtune.model.lora import adapter_state

SETS = ["federation.min_clients=2"]
HONEST = [100, 102]  # partitions 0 and 2; node 101 is the malicious one


@pytest.fixture(autouse=True)
def _server_identity():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _scenario(*extra):
    return load_scenario("tiny", [*SETS, *extra])


def _strategy(scenario):
    strategy = FedtuneStrategy(scenario)
    strategy.node_partition = {100 + i: i for i in range(4)}
    return strategy


def _state(seed=0, rank=4):
    model, _ = cache.get_peft_model(_scenario().model, LoraSpec(rank=rank, alpha=2.0 * rank),
                                    seed=0)
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in adapter_state(model).items()}


def _sent(node):
    return Message(content=keys.make_content(None, {keys.ROUND: 1}), dst_node_id=node,
                   message_type=MessageType.TRAIN)


def _reply(node, adapter, num_examples=10, **metrics):
    """A reply built as the client builds it; ``adapter`` a state dict or an ArrayRecord."""
    record = adapter if isinstance(adapter, ArrayRecord) else keys.state_to_record(adapter)
    values = {keys.NUM_EXAMPLES: num_examples, keys.TRAIN_LOSS: 1.0, keys.PARTITION: 0,
              **metrics}
    return keys.reply(_sent(node), values, record)


def _raw_reply(node, adapter, metrics):
    """A reply the client-side checks (check_outgoing) would refuse to send."""
    content = RecordDict({keys.ADAPTER: keys.state_to_record(adapter),
                          keys.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=_sent(node))


def _packed(state, bad=None):
    """``state`` packed as a compressed upload, one tensor replaced by a raw record."""
    spec = CompressionSpec(density=0.25)
    names = sorted(state)
    if bad is None:
        return keys.blob_to_record(encode_state(state, spec))
    from fedtune.core.compress import encode_tensor

    records = [bad if n == names[0] else encode_tensor(state[n], spec) for n in names]
    return keys.blob_to_record(pack_records(names, records))


def _empty_record(shape):
    """A sparse record declaring ``shape`` and carrying no values (a few bytes)."""
    return encode_indexed(shape, torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                          CompressionSpec(density=0.25))


def _dense_array_declaring(shape):
    """A float32 .npy array whose header declares ``shape``, with 16 bytes of data."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False,
                                                "shape": shape})
    return Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                 data=head.getvalue() + bytes(16))


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _assert_only_101_dropped(strategy, metrics, *reasons):
    assert metrics["num-clients"] == 2
    assert len(strategy.stats.dropped) == 1, strategy.stats.dropped
    assert strategy.stats.dropped[0].startswith("node 101: "), strategy.stats.dropped
    for reason in reasons:
        assert reason in strategy.stats.dropped[0], strategy.stats.dropped


# ---- (a) (b): declared sizes ---------------------------------------------------------
def test_a_packed_reply_declaring_a_40000x40000_tensor_is_dropped_without_allocating_it():
    scenario = _scenario("compression.upload_density=0.25")
    strategy = _strategy(scenario)
    strategy._train_messages([100, 101, 102], 1)
    good = _state()
    bad = _packed(good, _empty_record((40000, 40000)))
    assert keys.record_nbytes(bad) < keys.record_nbytes(keys.state_to_record(good)) / 2
    before = _peak_mb()
    _, metrics = strategy.aggregate_train(1, [_reply(100, _packed(good)), _reply(101, bad),
                                              _reply(102, _packed(good))])
    assert _peak_mb() - before < 200  # 6.4 GB of zeros (and a 1.6 GB mask) before the fix
    _assert_only_101_dropped(strategy, metrics, "undecodable adapter",
                             "40000x40000, rank 40000 instead of the assigned rank 4")


@pytest.mark.parametrize("form", ["packed", "dense"])
def test_a_reply_declaring_more_than_can_be_allocated_is_dropped_and_nothing_escapes(form):
    scenario = _scenario("compression.upload_density=0.25" if form == "packed" else
                         "compression.upload_density=1.0")
    strategy = _strategy(scenario)
    strategy._train_messages([100, 101, 102], 1)
    good = _state()
    if form == "packed":  # 2**40 entries: the allocator raised RuntimeError before the fix
        bad = _packed(good, _empty_record((2**20, 2**20)))
        honest = _packed(good)
    else:  # Flower's np.load allocates the header's shape first: MemoryError
        bad = keys.state_to_record(good)
        first = sorted(good)[0]
        bad[first] = _dense_array_declaring((2**20, 2**20))
        honest = good
    _, metrics = strategy.aggregate_train(1, [_reply(100, honest), _reply(101, bad),
                                              _reply(102, honest)])
    reason = ("1048576x1048576, rank 1048576 instead of the assigned rank 4" if form == "packed"
              else "16 data bytes for a declared [1048576, 1048576] float32 array")
    _assert_only_101_dropped(strategy, metrics, reason)


@pytest.mark.parametrize(("shape", "data", "reason"), [
    ((4, 64), 8, "8 data bytes for a declared [4, 64]"),  # short of its own header
    ((4, 64), 4 * 256 + 4, "1028 data bytes"),  # longer than it
    ((2, 128), 4 * 256, "rank 2 instead of the assigned rank 4"),  # same bytes, other shape
])
def test_a_dense_array_whose_header_and_data_disagree_is_dropped(shape, data, reason):
    strategy = _strategy(_scenario())
    good = _state()
    bad = keys.state_to_record(good)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False,
                                                "shape": shape})
    bad[sorted(good)[0]] = Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                                 data=head.getvalue() + bytes(data))
    _, metrics = strategy.aggregate_train(1, [_reply(100, good), _reply(101, bad),
                                              _reply(102, good)])
    _assert_only_101_dropped(strategy, metrics, reason)


def test_a_dense_array_of_another_dtype_is_dropped():
    strategy = _strategy(_scenario())
    good = _state()
    bad = keys.state_to_record(good)
    bad[sorted(good)[0]] = Array(good[sorted(good)[0]].to(torch.float64).numpy())
    _, metrics = strategy.aggregate_train(1, [_reply(100, good), _reply(101, bad),
                                              _reply(102, good)])
    _assert_only_101_dropped(strategy, metrics, "dtype float64, expected float32")


# ---- (c): the expected shapes come from the base model, not from the first reply ----
def _other_shapes(kind):
    good = _state(seed=5)
    if kind == "narrow":  # a self-consistent adapter for a model with 60 inputs
        return {k: (torch.randn(v.shape[0], 60) if "lora_A" in k else v)
                for k, v in good.items()}
    return {k: v for k, v in good.items() if ".layers.0." in k}  # half the modules


@pytest.mark.parametrize(("kind", "reason"), [
    ("narrow", "expected 4x64"),
    ("subset", "module names differ"),
])
def test_a_first_reply_with_other_shapes_is_dropped_and_the_honest_ones_accepted(kind, reason):
    strategy = _strategy(_scenario())
    a, b = _state(1), _state(2)
    _, metrics = strategy.aggregate_train(1, [_reply(101, _other_shapes(kind)),
                                              _reply(100, a, 10), _reply(102, b, 30)])
    _assert_only_101_dropped(strategy, metrics, reason)
    for module, factors in strategy.global_adapter.factors.items():
        key = module + ".lora_A.weight"
        torch.testing.assert_close(factors.A, (10 * a[key] + 30 * b[key]) / 40)


def test_the_expected_shapes_are_every_adapted_module_of_the_base_model():
    """From the model's config, before any reply: exactly the keys and shapes a peft
    model of the base has, for every LoRA target (checked against a real one and a
    weightless build of the architecture)."""
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    scenario = _scenario(f"lora.target_modules={','.join(targets)}")
    strategy = FedtuneStrategy(scenario)
    model, _ = cache.get_peft_model(scenario.model, LoraSpec(rank=4, alpha=8,
                                                             target_modules=targets), seed=0)
    state = adapter_state(model)
    real = {k.removesuffix(".lora_A.weight"): (v.shape[1], state[k.replace("lora_A", "lora_B")]
                                               .shape[0])
            for k, v in state.items() if k.endswith(".lora_A.weight")}
    assert strategy.expected == real and len(real) == 2 * len(targets)
    _, meta = describe_base(scenario.model.source, targets)
    assert strategy.expected == {replies.PEFT_PREFIX + n: (i, o) for n, (o, i) in meta.items()}


def test_the_expected_shapes_survive_a_checkpoint_and_refuse_another_model():
    from fedtune.flower.checkpoint import CheckpointError

    scenario = _scenario()
    strategy = _strategy(scenario)
    strategy.aggregate_train(1, [_reply(100, _state(1)), _reply(102, _state(2))])
    state = strategy.state_dict()
    restored = FedtuneStrategy(scenario)
    restored.load_state_dict(state)
    assert restored.expected == strategy.expected
    name = sorted(state["expected"])[0]
    state["expected"][name] = [60, 64]
    with pytest.raises(CheckpointError, match="another model"):
        FedtuneStrategy(scenario).load_state_dict(state)


# ---- (d): num-examples -----------------------------------------------------------------
def test_a_reply_claiming_10_to_the_12_examples_is_dropped_and_the_mean_is_the_honest_one():
    strategy = _strategy(_scenario())
    a, b, evil = _state(1), _state(2), _state(3)
    _, metrics = strategy.aggregate_train(1, [_reply(100, a, 10), _reply(101, evil, 10**12),
                                              _reply(102, b, 30)])
    _assert_only_101_dropped(strategy, metrics,
                             "num-examples 1000000000000 exceeds federation.max_examples = "
                             "100000")
    for module, factors in strategy.global_adapter.factors.items():
        for part, suffix in (("A", ".lora_A.weight"), ("B", ".lora_B.weight")):
            expected = (10 * a[module + suffix] + 30 * b[module + suffix]) / 40
            torch.testing.assert_close(getattr(factors, part), expected)


@pytest.mark.parametrize(("claim", "reason"), [
    (31, "num-examples 31 exceeds federation.max_examples = 30"),
    (float("inf"), "num-examples must be a number, got inf"),
    (float("nan"), "num-examples must be a number, got nan"),
    ([10, 10], "metric 'num-examples' must be one number"),
])
def test_the_bound_is_the_configured_one_and_non_numbers_are_dropped(claim, reason):
    strategy = _strategy(_scenario("federation.max_examples=30"))
    reply = _raw_reply(101, _state(3), {keys.NUM_EXAMPLES: claim, keys.TRAIN_LOSS: 1.0})
    _, metrics = strategy.aggregate_train(1, [_reply(100, _state(1), 10), reply,
                                              _reply(102, _state(2), 30)])
    _assert_only_101_dropped(strategy, metrics, reason)


def test_max_examples_is_validated_and_zero_means_no_bound():
    with pytest.raises(ConfigError, match=r"\[federation\] max_examples = -1 is not allowed"):
        load_scenario("tiny", ["federation.max_examples=-1"])
    with pytest.raises(ConfigError, match="federation.max_examples = 'many'"):
        load_scenario("tiny", ["federation.max_examples='many'"])
    assert load_scenario("tiny", []).federation.max_examples == 100_000
    strategy = _strategy(_scenario("federation.max_examples=0"))
    _, metrics = strategy.aggregate_train(1, [_reply(100, _state(1), 10),
                                              _reply(101, _state(2), 10**12)])
    assert metrics["num-clients"] == 2 and strategy.stats.dropped == []


# ---- (e): any exception a reply causes ------------------------------------------------
@pytest.mark.parametrize("error", [
    RuntimeError("allocator says no"), MemoryError(), KeyError("lora_A"),
    TypeError("unsupported operand"), struct.error("unpack requires a buffer"),
    pytest.param("protobuf", id="DecodeError"),
])
def test_a_reply_whose_decoding_raises_anything_is_dropped_and_the_round_goes_on(
        monkeypatch, error):
    if error == "protobuf":
        from google.protobuf.message import DecodeError

        error = DecodeError("Error parsing message")
    decode = replies.decode_adapter
    calls = []

    def flaky(record, rule):
        calls.append(1)
        if len(calls) == 2:  # the second reply, node 101's
            raise error
        return decode(record, rule)

    monkeypatch.setattr(replies, "decode_adapter", flaky)
    strategy = _strategy(_scenario())
    _, metrics = strategy.aggregate_train(1, [_reply(100, _state(1)), _reply(101, _state(2)),
                                              _reply(102, _state(3))])
    _assert_only_101_dropped(strategy, metrics, type(error).__name__)


def test_a_list_valued_metric_is_dropped_before_the_round_summary_reads_it():
    """MetricRecord allows lists; the round's summaries float() client metrics."""
    strategy = _strategy(_scenario())
    reply = _raw_reply(101, _state(2), {keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 1.0,
                                        keys.SECONDS_LOAD: [1.0, 2.0]})
    _, metrics = strategy.aggregate_train(1, [_reply(100, _state(1), **{keys.SECONDS_LOAD: 1.0}),
                                              reply, _reply(102, _state(3))])
    _assert_only_101_dropped(strategy, metrics, "metric 'seconds-load' must be one number")


def test_a_client_metric_cannot_overwrite_what_the_server_measured():
    records = []
    strategy = FedtuneStrategy(_scenario(), on_client=records.append)
    strategy.node_partition = {100 + i: i for i in range(4)}
    strategy.aggregate_train(1, [_reply(100, _state(1), **{"bytes-up": 0, "round": 99}),
                                 _reply(102, _state(2))])
    assert records[0]["round"] == 1 and records[0]["bytes_up"] > 4000


@pytest.mark.parametrize("metrics", [
    {keys.EVAL_LOSS: 1.0, keys.EVAL_TOKENS: [5, 5]},
    {keys.EVAL_LOSS: float("nan"), keys.EVAL_TOKENS: 5},
    {keys.EVAL_LOSS: 1.0, keys.EVAL_TOKENS: -3},
    {keys.EVAL_LOSS: 1.0},
    None,  # no metrics record at all
])
def test_a_bad_evaluation_reply_is_ignored_and_the_others_are_averaged(metrics):
    strategy = _strategy(_scenario())

    def eval_reply(node, values):
        sent = Message(content=keys.make_content(None, {keys.ROUND: 1}), dst_node_id=node,
                       message_type=MessageType.EVALUATE)
        content = RecordDict() if values is None else RecordDict(
            {keys.METRICS: MetricRecord(values)})
        return Message(content=content, reply_to=sent)

    result = strategy.aggregate_evaluate(1, [
        eval_reply(100, {keys.EVAL_LOSS: 2.0, keys.EVAL_TOKENS: 10}), eval_reply(101, metrics),
        eval_reply(102, {keys.EVAL_LOSS: 4.0, keys.EVAL_TOKENS: 30})])
    assert result["eval-tokens"] == 40 and result["eval-loss"] == pytest.approx(3.5)
