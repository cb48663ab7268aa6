"""A malicious server: it builds each train message as the real strategy does, then
asks one client for what its sealed scenario does not order, one attack per message,
and keeps every reply as the client sent it. ``attack`` plays it on any Grid (the
in-process one, or a real SuperLink's: ``app`` is the same attack as a ServerApp, which
writes what it captured to ``<run-dir>/attack.json``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedtune.config import scenario_from_flat
from fedtune.flower import messages as keys
from fedtune.flower.strategy import FedtuneStrategy

Tamper = Callable[[dict[str, Any], dict[str, Any] | None], None]


def _without_dpsgd(config: dict[str, Any], secure: dict[str, Any] | None) -> None:
    for key in (keys.DPSGD_NOISE, keys.DPSGD_CLIP, keys.DPSGD_DELTA, keys.DPSGD_ACCOUNTANT):
        del config[key]


def _setting(**asked: Any) -> Tamper:
    """A tamper that changes the message's ``client.*`` settings (or other config keys:
    ``asked`` with dots spelled as double underscores)."""
    return lambda config, secure: config.update(
        {k.replace("__", "."): v for k, v in asked.items()})


def _threshold_1(config: dict[str, Any], secure: dict[str, Any] | None) -> None:
    assert secure is not None, "the threshold attack needs a sealed secure-aggregation run"
    secure["threshold"] = 1


#: (name, what the server changes in an honest train message: its config and, in a run
#: sealed with secure aggregation, its SecAgg record); the honest ones train, every other
#: is refused. The scenario: fedavg, distributed DP, DP-SGD, run.rounds = 2.
ATTACKS: list[tuple[str, Tamper]] = [
    ("honest", lambda c, s: None),
    ("dp-fields = B", lambda c, s: c.update({keys.DP_FIELDS: "B"})),
    ("freeze A", lambda c, s: c.update({keys.FREEZE_A: True})),
    ("no DP-SGD keys", _without_dpsgd),
    ("weaker z", lambda c, s: c.update({keys.DPSGD_NOISE: 0.01, keys.DPSGD_CLIP: 100.0})),
    ("weaker delta", lambda c, s: c.update({keys.DPSGD_DELTA: 0.5})),
    ("smaller noise share", lambda c, s: c.update({keys.DP_NOISE_STD: 1e-6})),
    ("sparse upload", lambda c, s: c.update({keys.UPLOAD_DENSITY: 0.01})),
    ("threshold 1", _threshold_1),
    ("larger batch", _setting(client__batch_size=64)),
    ("shorter sequences", _setting(client__seq_len=8)),
    ("larger rank", _setting(client__rank=8, client__alpha=16.0)),
    ("larger alpha", _setting(client__alpha=80.0)),
    ("other quantization", _setting(client__quantization="nf4")),
    ("more steps", _setting(train__steps=1000)),
    ("larger lr", _setting(train__lr=1.0)),
    ("honest", lambda c, s: None),
    ("past run.rounds", lambda c, s: None),  # the third train message of a 2-round run
]
#: the attacks that need a run sealed with secure aggregation (skipped without)
SECURE_ONLY = frozenset({"threshold 1"})
#: the attacks the ServerApp plays on real processes (each message there costs seconds)
DEPLOYED = ("honest", "dp-fields = B", "no DP-SGD keys", "weaker z", "threshold 1",
            "honest", "past run.rounds")


def played(names: tuple[str, ...] | None, secure: bool) -> list[str]:
    """The attacks ``attack`` plays, in order (``names``, or all; SecAgg ones only when
    the run is sealed with secure aggregation)."""
    return [name for name, _ in ATTACKS if (names is None or name in names)
            and (secure or name not in SECURE_ONLY)]


def _record(name: str, message: Message, reply: Message) -> dict[str, Any]:
    """What came back, as plain JSON: the refusal, or the metrics and the tensors."""
    out: dict[str, Any] = {"attack": name,
                           "sent": {k: v for k, v in
                                    message.content.config_records[keys.CONFIG].items()
                                    if not k.startswith("client.")}}
    if reply.has_error():
        out["refused"] = reply.error.reason
        return out
    out["metrics"] = dict(reply.content.metric_records[keys.METRICS])
    out["records"] = sorted(reply.content)
    if keys.ADAPTER not in reply.content:  # a secure round's train stage: keys only
        out["secagg"] = sorted(reply.content.config_records["secagg"])
        return out
    payload = keys.record_to_state(message.content.array_records[keys.ADAPTER])
    state = keys.record_to_state(reply.content.array_records[keys.ADAPTER])
    out["delta_norm"] = {  # each factor's change against what was sent (zero: round 1)
        factor: float(sum(((v - payload[k]) if k in payload else v).pow(2).sum()
                          for k, v in state.items() if f".lora_{factor}." in k) ** 0.5)
        for factor in ("A", "B")}
    return out


def _honest_secagg(strategy: FedtuneStrategy, messages: list[Message]) -> dict[str, Any]:
    """The SecAgg record an honest server would add to this round's train messages (a
    majority threshold of the federation's nodes)."""
    from fedtune.flower import secagg

    settings = secagg.round_settings(strategy, messages)
    nodes = len(strategy.node_partition)
    return dataclasses.replace(settings, threshold=secagg.threshold_for(nodes, 0)).to_config()


def attack(grid: Grid, scenario: Any, names: tuple[str, ...] | None = None
           ) -> list[dict[str, Any]]:
    """The attacks of ``ATTACKS`` (``played``), in order, on one client; what each got
    back. Under secure aggregation every message carries the honest SecAgg record (or
    the attack's change to it): the client answers the train stage with its keys."""
    from flwr.app import ConfigRecord

    from fedtune.flower import secagg

    strategy = FedtuneStrategy(scenario)
    strategy.discover(grid)
    node = sorted(strategy.node_partition)[0]
    secure = scenario.privacy.secure_aggregation
    wanted = played(names, secure)
    captured, trained = [], 0
    for name, tamper in ATTACKS:
        if name not in wanted:
            continue
        message = strategy._train_messages([node], trained + 1)[0]
        config = dict(message.content.config_records[keys.CONFIG])
        record = _honest_secagg(strategy, [message]) if secure else None
        tamper(config, record)
        message.content[keys.CONFIG] = ConfigRecord(config)
        if record is not None:
            message.content[secagg.SECAGG] = ConfigRecord(record)
        reply = grid.send_and_receive([message], timeout=300)[0]
        captured.append(_record(name, message, reply))
        trained += not reply.has_error()
    return captured


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    scenario = scenario_from_flat(context.run_config)
    captured = attack(grid, scenario, DEPLOYED)
    Path(str(context.run_config["run-dir"]), "attack.json").write_text(
        json.dumps(captured, indent=1))
