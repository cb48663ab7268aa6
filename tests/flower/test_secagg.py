"""SecAgg+ on the Message API (fedtune.flower.secagg): the server gets the sum of the
clients' updates within the quantisation bound and nothing it can read of any one of
them; a client lost after sharing its keys is recovered by the threshold.

Protocol tests run the real client stages (``train_reply`` / ``client_step``) in a
ClientApp with a made-up update per node on the in-process Grid (no model); one test
runs a whole tiny federation through the round loop and the real ClientApp."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from fedtune.config import ConfigError, load_scenario
from fedtune.core.codec import A_SUFFIX, B_SUFFIX
from fedtune.core.init import seeded_lora_state
from fedtune.flower import secagg
from fedtune.flower.inprocess_grid import InProcessGrid, simulate_in_process
from fedtune.flower.population import RoundFailedError
from fedtune.flower.rounds import exchange
from fedtune.train.session import Upload

MODULES = {"layer.0.q": (96, 64), "layer.0.v": (96, 32)}  # module -> (in, out)
RANK = 4


def _update(partition: int) -> dict[str, torch.Tensor]:
    """Node ``partition``'s made-up LoRA update (its start is zero)."""
    g = torch.Generator().manual_seed(1000 + partition)
    out = {}
    for module, (fan_in, fan_out) in MODULES.items():
        out[module + A_SUFFIX] = torch.randn(RANK, fan_in, generator=g) * 0.01
        out[module + B_SUFFIX] = torch.randn(fan_out, RANK, generator=g) * 0.01
    return out


def _app(fail_at: dict[int, str] | None = None) -> ClientApp:
    """Each node answers stage 0 with ``_update`` of its partition and the later stages
    as the real client does; a node in ``fail_at`` raises at that stage."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        stage = str(message.content.config_records[secagg.SECAGG]["stage"])
        if (fail_at or {}).get(partition) == stage:
            raise ConnectionError(f"node {partition} lost at {stage}")
        if secagg.is_protocol_step(message):
            return secagg.client_step(message, context)
        state = _update(partition)
        start = {k: torch.zeros_like(v) for k, v in state.items()}
        return secagg.train_reply(message, context, Upload(state=state), start,
                                  {"num-examples": 1, "train-loss": 1.0})

    return app


SETTINGS = secagg.SecAggSettings(0, RANK, ("A", "B"), clip_norm=1.0, noise_std=0.0, bits=22)
ENTRIES = secagg.layout(MODULES, RANK, ("A", "B"))
SIZE = sum(a * b for _, (a, b) in ENTRIES)


def _flat(partition: int) -> np.ndarray:
    """The update as the layout flattens it (keys sorted, A as r x in, B as out x r),
    computed here without the module's helpers."""
    state = _update(partition)
    return np.concatenate([state[k].double().flatten().numpy() for k in sorted(state)])


def _protocol(num_nodes: int, fail_at: dict[int, str] | None = None, neighbours: int = 0,
              threshold: int = 0, seen: list[Message] | None = None):
    with InProcessGrid(_app(fail_at), num_nodes) as grid:
        nodes = list(grid.get_node_ids())
        messages = [Message(RecordDict({"config": ConfigRecord({"round": 1})}),
                            dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

        def send(batch):
            replies = exchange(grid, batch, timeout=30)
            if seen is not None:
                seen.extend(replies)
            return replies
        outcome = secagg.run_protocol(send, messages, 1, neighbours, threshold, SETTINGS,
                                      SIZE)
        return outcome, {n: grid.partition_of(n) for n in nodes}


def test_the_server_gets_the_sum_within_the_quantisation_bound():
    outcome, partition = _protocol(5)
    assert sorted(partition[n] for n in outcome.survivors) == [0, 1, 2, 3, 4]
    q = SETTINGS.quantizer
    summed = q.dequantize_sum(outcome.total, 5)
    plain = sum(_flat(p) for p in range(5))
    assert np.abs(summed - plain).max() <= q.sum_error_bound(5)
    assert np.abs(plain).max() > 100 * q.sum_error_bound(5)  # the updates are not ~0


def test_the_masked_vector_the_server_sees_is_uncorrelated_with_the_update():
    seen: list[Message] = []
    _, partition = _protocol(3, seen=seen)
    masked = {partition[r.metadata.src_node_id]: np.frombuffer(
        bytes(r.content.config_records[secagg.SECAGG]["masked"]), dtype="<u4")
        for r in seen if "masked" in r.content.config_records.get(secagg.SECAGG, {})}
    assert sorted(masked) == [0, 1, 2]
    update = _flat(0)
    unmasked = SETTINGS.quantizer.quantize(update).astype(np.float64)
    bound = 5 / np.sqrt(SIZE)  # |r| of independent vectors is ~N(0, 1/d)
    assert abs(np.corrcoef(unmasked, update)[0, 1]) > 0.99 > bound  # what a leak looks like
    assert abs(np.corrcoef(masked[0].astype(np.float64), update)[0, 1]) < bound
    # nor does it sit near the quantised values: the words look uniform (mean 2^31 with
    # std 2^31 / sqrt(3 d); the quantised values sit near 2^21, half the 22-bit range)
    assert abs(masked[0].astype(np.float64).mean() / 2**31 - 1) < 6 / np.sqrt(3 * SIZE)
    # and no reply carried an adapter or the plain update
    assert all("adapter" not in r.content.array_records for r in seen)


@pytest.mark.parametrize("stage", ["open", "collect", "unmask"])
def test_a_client_lost_after_sharing_keys_does_not_stop_the_round(stage):
    """Lost before the others mask (open): nobody masks with it. Lost before sending
    its masked vector: its pairwise masks are rebuilt from the shares of its secret key,
    and the sum is the survivors'. Lost at unmask: its vector is in the sum, and the
    others' shares of its seed suffice."""
    outcome, partition = _protocol(5, fail_at={2: stage}, neighbours=5, threshold=3)
    lost = [n for n in partition if partition[n] == 2]
    assert list(outcome.dropped) == lost and outcome.dropped[lost[0]].startswith(stage)
    in_sum = [0, 1, 2, 3, 4] if stage == "unmask" else [0, 1, 3, 4]
    assert sorted(partition[n] for n in outcome.survivors) == in_sum
    q = SETTINGS.quantizer
    summed = q.dequantize_sum(outcome.total, len(in_sum))
    assert np.abs(summed - sum(_flat(p) for p in in_sum)).max() <= q.sum_error_bound(5)


def test_too_many_losses_fail_the_round_with_the_reason():
    with pytest.raises(RoundFailedError, match="2 nodes are left, fewer than the 3"):
        _protocol(4, fail_at={0: "collect", 1: "collect"}, threshold=3)


def test_a_client_never_reveals_both_secrets_of_one_node():
    """An unmask request naming a node as survivor and dropped is refused (with both,
    the server could strip that node's masks and read its update)."""
    state = ConfigRecord({"stage": secagg.COLLECT, "threshold": 2, "holders": [1, 2, 3],
                          "seed-shares": [b"a", b"b", b"c"], "key-shares": [b"x", b"y", b"z"]})
    record = ConfigRecord({"stage": secagg.UNMASK, "active": [1, 2], "dead": [2]})
    with pytest.raises(ValueError, match="both survivor and dropped"):
        secagg._unmask(state, record, Context(1, 1, {}, RecordDict(), {}))
    out = secagg._unmask(state, ConfigRecord({"active": [1, 3], "dead": [2]}),
                         Context(1, 1, {}, RecordDict(), {}))
    assert out == {"nodes": [1, 3, 2], "shares": [b"a", b"c", b"y"]}


def test_stages_out_of_order_are_refused():
    context = Context(1, 1, {}, RecordDict(), {})
    context.state[secagg.STATE] = ConfigRecord({"stage": secagg.TRAIN})
    message = SimpleNamespace(content=RecordDict({
        secagg.SECAGG: ConfigRecord({"stage": secagg.UNMASK})}))
    with pytest.raises(ValueError, match="stage 'unmask' after 'train'"):
        secagg.client_step(message, context)


@pytest.mark.parametrize("overrides,message", [
    (['federation.aggregator="flora"'], "need each client's own factors"),
    (['federation.aggregator="flexlora"'], "need each client's own factors"),
    (['federation.aggregator="hetlora"'], "need each client's own factors"),
    (['privacy.mode="central"', "privacy.noise_multiplier=1"], "never sees"),
    (["compression.upload_density=0.5"], "upload_density = 1"),
    (['federation.merge="ties"'], "merge = 'mean'"),
    (["privacy.secagg_bits=31"], "secagg_bits = 31"),
    (["data.num_clients=2000", "privacy.secagg_bits=24"], "at most 21"),
])
def test_what_secure_aggregation_cannot_serve_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_scenario("tiny", ["privacy.secure_aggregation=true", *overrides])


def test_a_round_of_two_clients_sends_no_work():
    """With two clients the sum tells each the other's update: the round fails before
    anything is sent (under DP it would release noise only)."""
    strategy = SimpleNamespace(dp=None)
    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (1, 2)]

    def send(batch):
        raise AssertionError("work was sent")
    with pytest.raises(RoundFailedError, match="2 clients sampled, fewer than the 3"):
        secagg.secure_train(strategy, send, 1, messages)


@pytest.mark.parametrize("overrides", [
    [],
    ['federation.aggregator="ffa"', 'privacy.mode="distributed"', "privacy.noise_multiplier=0.5"],
], ids=["fedavg", "ffa-distributed-dp"])
def test_a_tiny_federation_aggregates_the_sum_it_never_saw(tmp_path, monkeypatch, overrides):
    """Four clients, one round: the global adapter is the shared seeded start plus the
    mean of the clients' clipped (and, under distributed DP, noised) updates as the
    clients computed them, within the quantisation bound; under ffa A stays frozen."""
    vectors: list[np.ndarray] = []
    real = secagg.update_vector

    def spy(state, start, settings):
        vectors.append(real(state, start, settings))
        return vectors[-1]
    monkeypatch.setattr(secagg, "update_vector", spy)
    scenario = load_scenario("tiny", ["privacy.secure_aggregation=true", "run.rounds=1",
                                      "privacy.clip_norm=0.05", "train.steps=2", *overrides])
    run_dir = simulate_in_process(scenario, out_dir=tmp_path)
    assert len(vectors) == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    record = summary["rounds"][-1]
    assert record["clients_replied"] == 4 and record["secagg_dropped"] == 0
    exported = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    shapes = {k: tuple(v.shape) for k, v in exported.items()}
    start = seeded_lora_state(scenario.run.seed, shapes)
    frozen_A = "ffa" in " ".join(overrides)
    mean = sum(vectors) / 4
    bound = record["secagg_sum_error_bound"] / 4
    at = 0
    for key in sorted(exported):  # the layout: peft keys in order, each flattened
        expected = start[key].clone()
        if not (frozen_A and key.endswith(A_SUFFIX)):
            size = exported[key].numel()
            expected += torch.from_numpy(mean[at: at + size]).reshape(shapes[key]).float()
            at += size
        tolerance = bound + 1e-6  # the export holds the factors as trained (peft's form)
        assert (exported[key] - expected).abs().max() <= tolerance, key
    assert at == mean.size
    if not frozen_A:
        assert max(np.linalg.norm(v) for v in vectors) <= 0.05 * (1 + 1e-9)  # clipped to C
        assert summary["privacy"]["server_sees"].startswith("the sum")
    else:  # noised after clipping: the range is C + 8 sigma of one share
        assert summary["privacy"]["server_sees"].startswith("the sum")
        sigma = 0.5 * 0.05 / np.sqrt(scenario.privacy.min_clients)
        assert record["secagg_range"] == pytest.approx(0.05 + 8 * sigma)


def test_distributed_dp_without_secure_aggregation_reports_each_clients_local_epsilon():
    """The server sees every share: the summary gives the epsilon of one share alone
    (noise z C / sqrt(min_clients), sensitivity 2 C, no subsampling), here from Opacus."""
    privacy = SimpleNamespace(secure_aggregation=False, mode="distributed", delta=1e-5,
                              accountant="rdp")
    dp = SimpleNamespace(settings=SimpleNamespace(noise_multiplier=4.0, min_clients=4),
                         accountant=SimpleNamespace(releases=3))
    view = secagg.server_view(privacy, dp)
    library = RDPAccountant()
    for _ in range(3):
        library.step(noise_multiplier=4.0 / (2 * 2), sample_rate=1.0)
    assert view["local_noise_multiplier"] == 1.0
    assert view["local_epsilon"] == pytest.approx(library.get_epsilon(1e-5), rel=1e-6)
    assert view["server_sees"] == "each client's clipped and noised share"
    with_secagg = secagg.server_view(SimpleNamespace(**{**vars(privacy),
                                                        "secure_aggregation": True}), dp)
    assert "local_epsilon" not in with_secagg and "sum" in with_secagg["server_sees"]
