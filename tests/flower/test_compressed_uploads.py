"""Compressed uploads through the real client and strategy code, with real Flower
messages: the server rebuilds each client's start exactly, so what a client sent lands
on the server as sent; bad packed payloads are dropped with a reason."""

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from fedtune.config import ConfigError, LoraSpec, load_scenario
from fedtune.core.compress import CompressionSpec, encode_indexed, encode_state, pack_records
from fedtune.core.init import seeded_lora_state
from fedtune.flower import messages as keys
from fedtune.flower.client_app import _keep, adapter_record, train_session
from fedtune.flower.strategy import FedtuneStrategy
from fedtune.model import cache
from fedtune.model.lora import adapter_state, reset_lora
from fedtune.planning.client_settings import ClientSettings


@pytest.fixture(autouse=True)
def _server_identity():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _scenario(aggregator="fedavg", *extra):
    return load_scenario("tiny", [f'federation.aggregator="{aggregator}"',
                                  "federation.min_clients=2", "compression.upload_density=0.25",
                                  *extra])


def _strategy(scenario):
    strategy = FedtuneStrategy(scenario)
    strategy.node_partition = {100 + i: i for i in range(4)}
    return strategy


def _context(partition):
    return Context(run_id=1, node_id=100 + partition,
                   node_config={"partition-id": partition, "num-partitions": 4},
                   state=RecordDict(), run_config={})


def _client_round(scenario, message, context, gen):
    """What a client does with a train message, with random 'training' in place of SGD:
    returns its final LoRA state and its reply."""
    settings = ClientSettings.from_config(message.content.config_records[keys.CONFIG])
    session = train_session(scenario, settings, message, context)
    session.prepare()
    start = session.start
    config = message.content.config_records[keys.CONFIG]
    frozen_A = bool(config[keys.FREEZE_A])
    trained = {k: v if frozen_A and "lora_A" in k else v + 0.1 * torch.randn(v.shape, generator=gen)
               for k, v in start.items()}
    upload = session.upload(trained)
    _keep(context, upload)
    metrics = {keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 1.0, keys.PARTITION: settings.partition,
               keys.RESIDUAL_NORM_IN: upload.residual_norm_in}
    return trained, start, keys.reply(message, metrics, adapter_record(upload))


def test_the_server_rebuilds_the_seeded_init_every_client_draws():
    scenario = _scenario()
    model, _ = cache.get_peft_model(scenario.model, LoraSpec(rank=4, alpha=8), seed=7)
    reset_lora(model, 7)
    state = adapter_state(model)
    rebuilt = seeded_lora_state(7, {k: tuple(v.shape) for k, v in state.items()})
    assert rebuilt.keys() == state.keys()
    assert all(torch.equal(rebuilt[k], state[k]) for k in state)
    assert not torch.equal(seeded_lora_state(8, {k: tuple(v.shape) for k, v in state.items()})[
        next(k for k in state if "lora_A" in k)], state[next(k for k in state if "lora_A" in k)])


@pytest.mark.parametrize(("aggregator", "extra"), [
    ("fedavg", ()),
    ("ffa", ()),
    ("zeropad", ("compression.download_values='int8'",)),
    ("flora", ()),
    ("flora", ('federation.flora_init="global"', "compression.download_values='fp16'")),
    ("flora", ("compression.selection='product'",)),
])
def test_sent_entries_land_exactly_and_the_rest_stays_at_the_start(aggregator, extra):
    scenario = _scenario(aggregator, *extra)
    strategy = _strategy(scenario)
    gen = torch.Generator().manual_seed(0)
    contexts = {p: _context(p) for p in range(4)}
    for server_round in (1, 2):  # round 1 from the seeded init, round 2 from a global
        messages = strategy._train_messages([100, 101, 102, 103], server_round)
        rounds = [_client_round(scenario, m, contexts[i], gen) for i, m in enumerate(messages)]
        for trained, start, reply in rounds:
            update = strategy._decode(reply)
            settings = strategy._settings(reply.metadata.src_node_id)
            for module, factors in update.factors.items():
                for part in ("A", "B"):
                    key = f"{module}.lora_{part}.weight"
                    mask = getattr(update.masks[module], part)
                    got = getattr(factors, part)
                    server_start = getattr(update.start[module], part)
                    if "download_values" not in " ".join(extra) or server_round == 1:
                        # the client's own start is the server's (exact, no download rounding)
                        assert torch.equal(server_start, start[key])
                    if aggregator == "ffa" and part == "A":
                        assert not mask.any()  # frozen A: nothing to send
                    elif "product" in " ".join(extra):  # the module's budget, split by effect
                        both = update.masks[module]
                        assert 0 < (both.A.sum() + both.B.sum()) / (both.A.numel()
                                                                     + both.B.numel()) <= 0.25
                    else:
                        assert 0 < mask.float().mean() <= 0.25 + 1e-9
                    if server_round == 1:  # no residual yet: sent entries are exact
                        assert torch.allclose(got[mask], trained[key][mask], atol=1e-6)
                    assert torch.equal(got[~mask], server_start[~mask])
            assert update.factors[module].scale == settings.alpha / settings.rank
        strategy.aggregate_train(server_round, [reply for _, _, reply in rounds])
        assert strategy.stats.dropped == []
        assert strategy.stats.bytes_up * 2.5 < strategy.stats.bytes_up_dense
    # error feedback: round 2's uploads carried round 1's residual, kept in node state
    assert all(keys.RESIDUAL in c.state.array_records for c in contexts.values())


def _packed_reply(node, state_or_blob):
    sent = Message(content=keys.make_content(None, {keys.ROUND: 1}), dst_node_id=node,
                   message_type=MessageType.TRAIN)
    metrics = {keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 1.0, keys.PARTITION: node - 100}
    blob = state_or_blob if isinstance(state_or_blob, torch.Tensor) and \
        state_or_blob.dtype == torch.uint8 else None
    if blob is None:
        blob = encode_state(state_or_blob, CompressionSpec(density=0.25))
    return keys.reply(sent, metrics, keys.blob_to_record(blob))


def _delta_state(scenario, rank=4):
    model, _ = cache.get_peft_model(scenario.model, LoraSpec(rank=rank, alpha=2.0 * rank),
                                    seed=0)
    gen = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=gen) for k, v in adapter_state(model).items()}


def _with_bad_first_tensor(state, record, bad_name=None):
    """The packed state with ``record`` in place of the first tensor (or of ``bad_name``)."""
    names = sorted(state)
    bad_name = bad_name or names[0]
    spec = CompressionSpec(density=0.25)
    from fedtune.core.compress import encode_tensor

    return pack_records(names, [record if n == bad_name else encode_tensor(state[n], spec)
                                for n in names])


@pytest.mark.parametrize(("kind", "reason"), [
    ("duplicate", "strictly increasing"),
    ("range", "out of range"),
    ("lengths", "undecodable adapter"),
    ("shape", "expected"),
    ("garbage", "not a fedtune packed payload"),
])
def test_a_malformed_packed_reply_is_dropped_and_the_round_goes_on(kind, reason):
    scenario = _scenario()
    strategy = _strategy(scenario)
    strategy._train_messages([100, 101, 102], 1)
    good = _delta_state(scenario)
    first = sorted(good)[0]
    shape = tuple(good[first].shape)
    spec = CompressionSpec(density=0.25)
    if kind == "duplicate":
        bad = _with_bad_first_tensor(good, encode_indexed(
            shape, torch.tensor([0, 3, 3]), torch.ones(3), spec))
    elif kind == "range":  # 250 fits the index width but not v_proj B's 32 x 4 entries
        small = next(n for n in sorted(good) if good[n].numel() < 250)
        bad = _with_bad_first_tensor(good, encode_indexed(
            tuple(good[small].shape), torch.tensor([0, 250]), torch.ones(2), spec), small)
    elif kind == "lengths":
        bad = _with_bad_first_tensor(good, encode_indexed(
            shape, torch.tensor([0, 1]), torch.ones(3), spec))
    elif kind == "shape":  # declares a wider A than the module has
        wider = dict(good)
        wider[first] = torch.randn(shape[0], shape[1] + 3)
        bad = encode_state(wider, spec)
    else:
        bad = torch.frombuffer(bytearray(b"not a payload at all"), dtype=torch.uint8)
    replies = [_packed_reply(100, good), _packed_reply(101, bad), _packed_reply(102, good)]
    strategy.aggregate_train(1, replies)
    assert len(strategy.stats.dropped) == 1, strategy.stats.dropped
    assert "node 101" in strategy.stats.dropped[0] and reason in strategy.stats.dropped[0]
    assert strategy.global_adapter is not None


def test_a_packed_reply_of_higher_rank_than_assigned_is_dropped():
    scenario = _scenario()
    strategy = _strategy(scenario)
    strategy._train_messages([100, 101, 102], 1)
    good, wide = _delta_state(scenario), _delta_state(scenario, rank=6)
    strategy.aggregate_train(1, [_packed_reply(100, good), _packed_reply(101, wide),
                                 _packed_reply(102, good)])
    assert any("instead of the assigned rank 4" in d for d in strategy.stats.dropped)


def test_train_messages_carry_the_compression_settings_and_count_bytes_per_node():
    scenario = _scenario("fedavg", "compression.upload_values='int8'",
                         "compression.error_feedback=false", "compression.block_size=64")
    strategy = _strategy(scenario)
    message = strategy._train_messages([100, 101], 1)[0]
    config = message.content.config_records[keys.CONFIG]
    assert (config[keys.UPLOAD_DENSITY], config[keys.UPLOAD_VALUES], config[keys.BLOCK_SIZE],
            config[keys.ERROR_FEEDBACK]) == (0.25, "int8", 64, False)
    assert strategy.stats.down_by_node == {100: 0, 101: 0}  # round 1: nothing to download


@pytest.mark.parametrize(("override", "message"), [
    ("compression.upload_density=0", "upload_density = 0"),
    ("compression.upload_density=1.5", "upload_density = 1.5"),
    ("compression.upload_values='int4'", "upload_values = 'int4'"),
    ("compression.download_values='bf16'", "download_values = 'bf16'"),
    ("compression.block_size=0", "block_size"),
    ("compression.selection='best'", "selection = 'best'"),
    ("compression.density=0.1", "unknown key compression.density"),
    ("federation.merge='median'", "merge = 'median'"),
    ("federation.ties_density=0", "ties_density"),
    ("federation.padding='ones'", "padding = 'ones'"),
    ("federation.padding='skip'", "unless aggregator is hetlora or zeropad"),
])
def test_compression_keys_are_validated_with_the_key_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_scenario("tiny", [override])


def test_ties_is_refused_for_aggregators_that_do_not_merge_entries():
    with pytest.raises(ConfigError, match="merge = 'ties'.*flora"):
        load_scenario("tiny", ['federation.aggregator="flora"', "federation.merge='ties'"])
    scenario = load_scenario("tiny", ["federation.merge='ties'"])
    assert FedtuneStrategy(scenario).aggregator.merge == "ties"


def test_after_an_int8_download_the_update_lands_on_the_full_precision_global():
    """Real client code, (almost) no learning: the client starts from a rounded copy of
    the global and sends its update; the server adds it to its own exact copy."""
    from fedtune.flower.client_app import train_message

    scenario = load_scenario("tiny", ["compression.download_values='int8'", "train.lr=1e-12",
                                      "train.weight_decay=0", "train.steps=1",
                                      "federation.min_clients=1"])
    strategy = _strategy(scenario)
    gen = torch.Generator().manual_seed(3)
    model, _ = cache.get_peft_model(scenario.model, LoraSpec(rank=4, alpha=8), seed=0)
    exact = {k: torch.randn(v.shape, generator=gen) for k, v in adapter_state(model).items()}
    from fedtune.core.adapters import GlobalAdapter
    from fedtune.core.codec import factors_from_state_dict

    strategy.global_adapter = GlobalAdapter(factors_from_state_dict(exact, 2.0), round=1)
    message = strategy._train_messages([100], 2)[0]
    record = message.content.array_records[keys.ADAPTER]
    assert keys.is_packed(record)
    rounded = keys.record_to_state(record)
    assert max(float((rounded[k] - exact[k]).abs().max()) for k in exact) > 1e-3
    reply = train_message(scenario, message, _context(0))
    assert keys.is_packed(reply.content.array_records[keys.ADAPTER])  # an update, not a state
    update = strategy._decode(reply)
    for module, factors in update.factors.items():
        assert torch.allclose(factors.A, exact[module + ".lora_A.weight"], atol=1e-6)
        assert torch.allclose(factors.B, exact[module + ".lora_B.weight"], atol=1e-6)
