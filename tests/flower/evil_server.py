"""A malicious server: it builds each train message as the real strategy does, then
asks one client for what its sealed scenario does not order, one attack per message,
and keeps every reply as the client sent it. ``attack`` plays it on any Grid (the
in-process one, or a real SuperLink's: ``app`` is the same attack as a ServerApp, which
writes what it captured to ``<run-dir>/attack.json``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedtune.config import scenario_from_flat
from fedtune.flower import messages as keys
from fedtune.flower.strategy import FedtuneStrategy

Tamper = Callable[[dict[str, Any]], None]


def _without_dpsgd(config: dict[str, Any]) -> None:
    for key in (keys.DPSGD_NOISE, keys.DPSGD_CLIP, keys.DPSGD_DELTA, keys.DPSGD_ACCOUNTANT):
        del config[key]


#: (name, what the server changes in an honest train message); the honest ones train,
#: every other is refused. The scenario: fedavg, distributed DP, DP-SGD, run.rounds = 2.
ATTACKS: list[tuple[str, Tamper]] = [
    ("honest", lambda c: None),
    ("dp-fields = B", lambda c: c.update({keys.DP_FIELDS: "B"})),
    ("freeze A", lambda c: c.update({keys.FREEZE_A: True})),
    ("no DP-SGD keys", _without_dpsgd),
    ("weaker z", lambda c: c.update({keys.DPSGD_NOISE: 0.01, keys.DPSGD_CLIP: 100.0})),
    ("weaker delta", lambda c: c.update({keys.DPSGD_DELTA: 0.5})),
    ("smaller noise share", lambda c: c.update({keys.DP_NOISE_STD: 1e-6})),
    ("sparse upload", lambda c: c.update({keys.UPLOAD_DENSITY: 0.01})),
    ("honest", lambda c: None),
    ("past run.rounds", lambda c: None),  # the third train message of a 2-round run
]
#: the attacks the ServerApp plays on real processes (each message there costs seconds)
DEPLOYED = ("honest", "dp-fields = B", "no DP-SGD keys", "weaker z", "honest",
            "past run.rounds")


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
    payload = keys.record_to_state(message.content.array_records[keys.ADAPTER])
    state = keys.record_to_state(reply.content.array_records[keys.ADAPTER])
    out["delta_norm"] = {  # each factor's change against what was sent (zero: round 1)
        factor: float(sum(((v - payload[k]) if k in payload else v).pow(2).sum()
                          for k, v in state.items() if f".lora_{factor}." in k) ** 0.5)
        for factor in ("A", "B")}
    return out


def attack(grid: Grid, scenario: Any, names: tuple[str, ...] | None = None
           ) -> list[dict[str, Any]]:
    """The attacks of ``ATTACKS`` (those ``names``, or all), in order, on one client;
    what each got back."""
    strategy = FedtuneStrategy(scenario)
    strategy.discover(grid)
    node = sorted(strategy.node_partition)[0]
    captured, trained = [], 0
    for name, tamper in ATTACKS:
        if names is not None and name not in names:
            continue
        message = strategy._train_messages([node], trained + 1)[0]
        config = dict(message.content.config_records[keys.CONFIG])
        tamper(config)
        message.content[keys.CONFIG] = type(message.content.config_records[keys.CONFIG])(config)
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
