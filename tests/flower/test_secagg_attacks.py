"""SecAgg+ against one malicious client (and a server asking for threshold 1), on the
in-process Grid: the real client stages, an attacker that rewrites its own replies.

(a) 2^31 added to one word of its masked vector: the range check fails the round;
(b) a round left with 2 survivors releases nothing;
(c) junk ciphertexts make the sender a dropout (never a crash), junk shares at unmask
    are set aside by the owners' digests, and the whole run completes with the bad
    client dropped (the real ClientApp, strategy and round loop, distributed DP)."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from fedtune.config import ConfigError, load_scenario
from fedtune.core.codec import A_SUFFIX, B_SUFFIX
from fedtune.flower import secagg
from fedtune.flower.client_app import make_client_app
from fedtune.flower.inprocess_grid import InProcessGrid, simulate_in_process
from fedtune.flower.population import RoundFailedError
from fedtune.flower.rounds import exchange
from fedtune.flower.server_app import run_federation
from fedtune.runs.rundir import new_run_dir
from fedtune.train.session import Upload

MODULES = {"layer.0.q": (16, 12), "layer.0.v": (16, 8)}
RANK = 2
SETTINGS = secagg.SecAggSettings(0, RANK, ("A", "B"), clip_norm=1.0, noise_std=0.0, bits=22)
ENTRIES = secagg.layout(MODULES, RANK, ("A", "B"))
SIZE = sum(a * b for _, (a, b) in ENTRIES)
Attack = Callable[[str, Message, Message], None]  # (stage, message, honest reply): rewrite


def _update(partition: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7 + partition)
    out = {}
    for module, (fan_in, fan_out) in MODULES.items():
        out[module + A_SUFFIX] = torch.randn(RANK, fan_in, generator=g) * 0.05
        out[module + B_SUFFIX] = torch.randn(fan_out, RANK, generator=g) * 0.05
    return out


def _flat(partition: int) -> np.ndarray:
    state = _update(partition)
    return np.concatenate([state[k].double().flatten().numpy() for k in sorted(state)])


def _app(attacks: dict[int, Attack]) -> ClientApp:
    """Honest clients; the partitions in ``attacks`` rewrite their honest replies."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        stage = str(message.content.config_records[secagg.SECAGG]["stage"])
        if secagg.is_protocol_step(message):
            reply = secagg.client_step(message, context)
        else:
            state = _update(partition)
            start = {k: torch.zeros_like(v) for k, v in state.items()}
            reply = secagg.train_reply(message, context, Upload(state=state), start,
                                       {"num-examples": 1, "train-loss": 1.0})
        if partition in attacks:
            attacks[partition](stage, message, reply)
        return reply

    return app


def _record(reply: Message) -> ConfigRecord:
    return reply.content.config_records[secagg.SECAGG]


def shift(stage: str, message: Message, reply: Message) -> None:
    """(a): 2^31 added to word 0 of the masked vector (mod 2^32)."""
    if stage == secagg.COLLECT:
        words = np.frombuffer(bytes(_record(reply)["masked"]), dtype="<u4").copy()
        words[0] += np.uint32(2**31)
        _record(reply)["masked"] = words.tobytes()


def junk_to(victims: int = 1) -> Attack:
    """Garbage ciphertexts for the first ``victims`` of its destinations."""
    def attack(stage: str, message: Message, reply: Message) -> None:
        if stage == secagg.SHARE:
            texts = list(_record(reply)["ciphertexts"])
            for i in range(min(victims, len(texts))):
                texts[i] = os.urandom(len(texts[i]))
            _record(reply)["ciphertexts"] = texts
    return attack


def junk_shares(stage: str, message: Message, reply: Message) -> None:
    """Random bytes for every share it returns at unmask."""
    if stage == secagg.UNMASK:
        _record(reply)["shares"] = [os.urandom(len(s)) for s in _record(reply)["shares"]]


def _run(num_nodes: int, attacks: dict[int, Attack], seen: list[Message] | None = None,
         **options):
    with InProcessGrid(_app(attacks), num_nodes) as grid:
        nodes = list(grid.get_node_ids())
        partition = {n: grid.partition_of(n) for n in nodes}
        messages = [Message(RecordDict({"config": ConfigRecord({"round": 1})}),
                            dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

        def send(batch):
            replies = exchange(grid, batch, timeout=30)
            if seen is not None:
                seen.extend(replies)
            return replies
        try:
            outcome = secagg.run_protocol(send, messages, 1, options.get("neighbours", 0),
                                          options.get("threshold", 0), SETTINGS, SIZE)
        except RoundFailedError as err:
            return err, partition
        return outcome, partition


def _sum_of(outcome) -> np.ndarray:
    return SETTINGS.quantizer.dequantize_sum(outcome.total, len(outcome.survivors))


def test_a_shift_of_2_to_the_31_is_caught_by_the_range_check():
    outcome, partition = _run(4, {0: shift})
    assert sorted(partition[n] for n in outcome.survivors) == [0, 1, 2, 3]  # in the sum
    with pytest.raises(RoundFailedError, match=r"1 of \d+ coordinates .* outside"):
        secagg.checked_sum(outcome, SETTINGS, ENTRIES, 0.0)
    honest, _ = _run(4, {})  # the same round without the shift passes
    released = secagg.checked_sum(honest, SETTINGS, ENTRIES, 0.0)
    plain = sum(_flat(p) for p in range(4))
    flat = np.concatenate([released[k].flatten().numpy() for k, _ in ENTRIES])
    assert np.abs(flat - plain).max() <= SETTINGS.quantizer.sum_error_bound(4)


def test_a_shift_that_stays_in_range_passes_and_is_bounded_as_documented():
    """What the range check cannot stop (docs/privacy.md, "Integrity"): a client that
    moves a word by less than the room left passes; the mean still lies within
    [-R, R] in every coordinate, so one client moved it by less than 2 R."""
    def nudge(stage: str, message: Message, reply: Message) -> None:
        if stage == secagg.COLLECT:
            words = np.frombuffer(bytes(_record(reply)["masked"]), dtype="<u4").copy()
            words[0] += np.uint32(3 * SETTINGS.quantizer.levels // 2)  # 1.5 clients' range
            _record(reply)["masked"] = words.tobytes()
    honest, _ = _run(4, {})
    nudged, _ = _run(4, {0: nudge})
    released = secagg.checked_sum(nudged, SETTINGS, ENTRIES, 0.0)
    flat = np.concatenate([released[k].flatten().numpy() for k, _ in ENTRIES])
    moved = flat[0] - _sum_of(honest)[0]
    assert 2.9 * SETTINGS.quantizer.value_range < moved < 3.1 * SETTINGS.quantizer.value_range
    assert np.abs(flat / 4).max() <= SETTINGS.quantizer.value_range


def test_the_mean_is_held_to_max_update_norm():
    honest, _ = _run(3, {})
    mean_norm = float(np.linalg.norm(_sum_of(honest) / 3))
    secagg.checked_sum(honest, SETTINGS, ENTRIES, 2 * mean_norm)
    with pytest.raises(RoundFailedError, match="exceeds federation.max_update_norm"):
        secagg.checked_sum(honest, SETTINGS, ENTRIES, mean_norm / 2)


def test_a_junk_ciphertext_makes_its_sender_a_dropout_not_a_crash():
    """Its victim opens the others' shares, refuses the attacker's; the attacker is out
    of the sum, which is the four honest clients' exactly (within quantisation)."""
    outcome, partition = _run(5, {0: junk_to(1)}, neighbours=5, threshold=3)
    lost = [n for n in partition if partition[n] == 0]
    assert list(outcome.dropped) == lost
    assert "could not open the shares" in outcome.dropped[lost[0]]
    assert sorted(partition[n] for n in outcome.survivors) == [1, 2, 3, 4]
    plain = sum(_flat(p) for p in (1, 2, 3, 4))
    assert np.abs(_sum_of(outcome) - plain).max() <= SETTINGS.quantizer.sum_error_bound(4)


def test_a_three_client_round_left_with_two_survivors_releases_nothing():
    """(b): the attacker's junk for the third client takes the attacker out; victim and
    one honest client are left, and two must not learn each other's update."""
    failed, _ = _run(3, {0: junk_to(1)})
    assert isinstance(failed, RoundFailedError)
    assert "after open, 2 nodes are left, fewer than the 3" in str(failed)


def test_junk_ciphertexts_for_everyone_fail_no_run():
    """Before, five clients with junk for all raised from deep in the protocol; now
    the attacker is simply out."""
    outcome, partition = _run(5, {0: junk_to(4)})
    assert sorted(partition[n] for n in outcome.survivors) == [1, 2, 3, 4]


def test_junk_shares_at_unmask_are_set_aside_by_the_digests():
    """The attacker's vector is in the sum; its shares of the others' seeds match no
    digest, so it is lost at unmask and the others' shares rebuild every seed."""
    outcome, partition = _run(5, {0: junk_shares}, threshold=3)
    lost = [n for n in partition if partition[n] == 0]
    assert list(outcome.dropped) == lost and outcome.dropped[lost[0]].startswith("unmask")
    assert sorted(partition[n] for n in outcome.survivors) == [0, 1, 2, 3, 4]
    plain = sum(_flat(p) for p in range(5))
    assert np.abs(_sum_of(outcome) - plain).max() <= SETTINGS.quantizer.sum_error_bound(5)


def test_junk_shares_with_no_spare_holder_fail_the_round_cleanly():
    """Threshold = everyone: without the attacker's shares no seed can be rebuilt; the
    round fails with the reason, nothing raises from the share arithmetic."""
    failed, _ = _run(3, {0: junk_shares}, threshold=3)
    assert isinstance(failed, RoundFailedError)
    assert "valid shares of a survivor's seed, fewer than the threshold 3" in str(failed)


def test_a_client_refuses_threshold_1_naming_the_setting(monkeypatch):
    """A server that asks for t = 1 (here: its threshold rule replaced) gets a refusal
    from every client, at train, naming privacy.secagg_threshold."""
    monkeypatch.setattr(secagg, "threshold_for", lambda neighbourhood, wanted: 1)
    seen: list[Message] = []
    failed, _ = _run(3, {}, seen)
    assert isinstance(failed, RoundFailedError)
    reasons = [r.error.reason for r in seen if r.has_error()]
    assert len(reasons) == 3
    assert all("privacy.secagg_threshold = 1 is below 2" in r for r in reasons), reasons


def test_a_client_refuses_less_than_a_majority_of_its_key_sharing_nodes(monkeypatch):
    monkeypatch.setattr(secagg, "threshold_for", lambda neighbourhood, wanted: 2)
    seen: list[Message] = []
    failed, _ = _run(5, {}, seen)
    assert "after share-keys, 0 nodes are left" in str(failed)
    reasons = [r.error.reason for r in seen if r.has_error()]
    assert len(reasons) == 5
    assert all("privacy.secagg_threshold = 2 is below 3, a majority of the 5" in r
               for r in reasons), reasons


def test_the_server_rule_refuses_a_threshold_below_the_clients_floor():
    with pytest.raises(ConfigError, match="privacy.secagg_threshold = 2 .* allowed 3 .. 5"):
        secagg.threshold_for(5, 2)
    assert secagg.threshold_for(5, 0) == 3 and secagg.threshold_for(3, 0) == 2


def test_the_real_client_app_refuses_threshold_1_and_the_run_completes(tmp_path, monkeypatch):
    """The real ClientApp refuses before training; each round fails (counted), the run
    does not."""
    monkeypatch.setattr(secagg, "threshold_for", lambda neighbourhood, wanted: 1)
    scenario = load_scenario("tiny", ["privacy.secure_aggregation=true", "run.rounds=2",
                                      "train.steps=1", "data.max_eval_sequences=2"])
    run_dir = simulate_in_process(scenario, out_dir=tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    trained = [r for r in summary["rounds"] if r["round"] >= 1]
    assert [r["clients_replied"] for r in trained] == [0, 0]
    assert [r["secagg_failed"] for r in trained] == [1, 1]
    dropped = " ".join(d for r in trained for d in r["dropped"])
    refused_at_train = re.findall(r"secure aggregation, train: [^:]*refuses to train: "
                                  r"privacy.secagg_threshold = 1 is below 2", dropped)
    assert len(refused_at_train) == 8, dropped  # 4 clients x 2 rounds, before training


def _attacker(default: ClientApp, attack_by_round: dict[int, Attack], bad: int = 3
              ) -> Callable:
    """The real ClientApp for every client; partition ``bad`` rewrites its replies, by
    the number of secure rounds it has trained in."""
    trained = itertools.count(1)
    current = [0]

    def app(message: Message, context: Context) -> Message:
        reply = default(message=message, context=context)
        record = message.content.config_records.get(secagg.SECAGG)
        if int(context.node_config["partition-id"]) != bad or record is None or \
                reply.has_error():
            return reply
        if record["stage"] == secagg.TRAIN:
            current[0] = next(trained)
        attack = attack_by_round.get(current[0])
        if attack is not None:
            attack(str(record["stage"]), message, reply)
        return reply
    return app


def test_a_federation_with_distributed_dp_survives_a_malicious_client(tmp_path, caplog):
    """Real ClientApp, strategy and round loop, SecAgg+ with distributed DP, four
    clients, the fourth malicious: round 1 shifts (range check: the round fails,
    releases noise only, is charged), round 2 sends one junk ciphertext (it is dropped,
    three clients' sum released), round 3 does that and claims a neighbour's shares did
    not open (two left: nothing of theirs is released). The run completes."""
    def junk_and_blame(stage: str, message: Message, reply: Message) -> None:
        junk_to(1)(stage, message, reply)
        if stage == secagg.OPEN:
            sources = list(message.content.config_records[secagg.SECAGG]["sources"])
            _record(reply)["rejected"] = [int(sources[-1])]
    scenario = load_scenario("tiny", [
        "privacy.secure_aggregation=true", "run.rounds=3", "train.steps=1",
        "data.max_eval_sequences=2", 'federation.aggregator="ffa"',
        'privacy.mode="distributed"', "privacy.noise_multiplier=0.5",
        "privacy.clip_norm=0.05"])
    run_dir = new_run_dir(tmp_path, "attacked")
    app = _attacker(make_client_app(scenario), {1: shift, 2: junk_to(1), 3: junk_and_blame})
    with InProcessGrid(app, scenario.data.num_clients) as grid:
        run_federation(grid, scenario, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    trained = [r for r in summary["rounds"] if r["round"] >= 1]
    assert [r["clients_replied"] for r in trained] == [0, 3, 0]
    assert [r.get("secagg_failed", 0) for r in trained] == [1, 0, 1]
    assert trained[1]["secagg_dropped"] == 1  # the attacker, out of round 2's sum
    assert summary["privacy"]["rounds_released"] == 3  # every round charged
    assert [r.get("secagg_failure") for r in trained] == ["range check", None,
                                                         "too few after open"]
    assert "bytes_up" not in trained[0]  # withheld under client-level DP (the cohort)
    log = caplog.text
    assert "round 1 failed: secure aggregation: 1 of" in log and "outside" in log
    assert "round 3 failed: secure aggregation: after open, 2 nodes are left" in log


def test_a_five_client_run_completes_with_the_bad_client_dropped(tmp_path):
    """(c), the issue's case: five clients, the real ClientApp, strategy and round loop.
    Round 1 the bad client sends garbage ciphertexts to every neighbour: it is dropped
    at open and the four honest clients' sum is released; round 2 it sends junk shares
    at unmask: they are set aside by the digests (its masked vector is in the sum, its
    masks removed with the others' shares) and the round is released. The run
    completes (before, round 1 raised RoundFailedError out of run_rounds)."""
    scenario = load_scenario("tiny", [
        "privacy.secure_aggregation=true", "run.rounds=2", "train.steps=1",
        "data.num_clients=5", "data.max_eval_sequences=2", "privacy.secagg_threshold=3"])
    run_dir = new_run_dir(tmp_path, "attacked")
    app = _attacker(make_client_app(scenario), {1: junk_to(4), 2: junk_shares}, bad=4)
    with InProcessGrid(app, scenario.data.num_clients) as grid:
        run_federation(grid, scenario, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    trained = [r for r in summary["rounds"] if r["round"] >= 1]
    assert [r.get("secagg_failed", 0) for r in trained] == [0, 0]
    assert [r["clients_replied"] for r in trained] == [4, 5]
    assert [r["secagg_dropped"] for r in trained] == [1, 1]
    first, second = (" ".join(r["dropped"]) for r in trained)
    assert "could not open the shares" in first, first
    assert "unmask" in second, second
    assert summary["rounds"][-1]["eval_loss"] is not None


def test_a_share_sent_twice_at_unmask_is_set_aside():
    """A valid share repeated would break the interpolation: its holder is set aside."""
    def twice(stage: str, message: Message, reply: Message) -> None:
        if stage == secagg.UNMASK:
            record = _record(reply)
            record["nodes"] = [*record["nodes"], record["nodes"][0]]
            record["shares"] = [*record["shares"], record["shares"][0]]
    outcome, partition = _run(5, {0: twice}, threshold=3)
    lost = [n for n in partition if partition[n] == 0]
    assert list(outcome.dropped) == lost and outcome.dropped[lost[0]].startswith("unmask")
    plain = sum(_flat(p) for p in range(5))
    assert np.abs(_sum_of(outcome) - plain).max() <= SETTINGS.quantizer.sum_error_bound(5)
