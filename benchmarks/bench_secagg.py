"""What SecAgg+ costs per round: time and bytes of the same run with and without
``privacy.secure_aggregation``, at several client counts, measured in one process on the
in-process Grid (the real round loop, strategy and ClientApp; no engine, so the
protocol's own cost is not hidden behind Ray's).

  python benchmarks/bench_secagg.py [--scenario tiny] [--clients 3 10] [--rounds 3]
      [--set KEY=VALUE ...] [--out benchmarks/secagg]
  python benchmarks/bench_secagg.py --protocol-only smollm2 [--rank 8] [--clients 3 10]
      [--repeat N]   (the median of N protocol runs: the shared machine's load varies)

Bytes are counted at the Grid: the protobuf size of every message's content each way
(train phase and evaluation, every protocol stage), the same measure for both runs.
Time per round is the train phase (training, the protocol, aggregation), the mean over
rounds 2.. (round 1 also loads the model). Every client of a round trains (all sampled).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from flwr.common.serde import recorddict_to_proto

from fedtune.config import load_scenario
from fedtune.flower.client_app import make_client_app
from fedtune.flower.inprocess_grid import InProcessGrid
from fedtune.flower.server_app import run_federation
from fedtune.runs.rundir import SUMMARY_FILE, new_run_dir


class CountingGrid(InProcessGrid):
    """Counts the bytes of every message pushed and every reply pulled."""

    up = down = 0

    def push_messages(self, messages):
        messages = list(messages)
        self.down += sum(recorddict_to_proto(m.content).ByteSize() for m in messages)
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        self.up += sum(recorddict_to_proto(r.content).ByteSize() for r in replies
                       if not r.has_error())
        return replies


def one_run(scenario_name: str, clients: int, rounds: int, secure: bool, sets: list[str],
            out: Path) -> dict:
    scenario = load_scenario(scenario_name, [
        f"data.num_clients={clients}", "federation.clients_per_round=0",
        f"run.rounds={rounds}", f"privacy.secure_aggregation={str(secure).lower()}",
        "federation.min_clients=2", *sets])
    run_dir = new_run_dir(out, f"{scenario_name}-{clients}-{'secagg' if secure else 'plain'}")
    began = time.perf_counter()
    with CountingGrid(make_client_app(scenario), clients) as grid:
        run_federation(grid, scenario, run_dir)
        up, down = grid.up, grid.down
    wall = time.perf_counter() - began
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    trained = [r for r in summary["rounds"] if r["round"] >= 1]
    later = trained[1:] or trained
    return {"clients": clients, "secure": secure, "wall_s": wall,
            "train_phase_s": statistics.mean(r["seconds_train_phase"] for r in later),
            "protocol_s": statistics.mean(sum(v for k, v in r.items()
                                               if k.startswith("secagg_seconds_")
                                               and k != "secagg_seconds_train")
                                           for r in later),
            "bytes_up_per_round": up / rounds, "bytes_down_per_round": down / rounds,
            "final_eval_loss": trained[-1].get("eval_loss"), "run_dir": str(run_dir)}


def protocol_only(model: str, targets: tuple[str, ...], rank: int, clients: int,
                  bits: int = 22) -> dict:
    """The protocol alone (no training) on one model's LoRA layout: clients with random
    updates in this process, one at a time, so a stage's seconds are the sum of every
    client's work plus the server's. Bytes: what the stages add, against the fp32
    adapter a plain reply carries."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp

    from fedtune.flower import secagg
    from fedtune.flower.replies import expected_modules
    from fedtune.flower.rounds import exchange
    from fedtune.train.session import Upload

    modules = expected_modules(model, targets)
    entries = secagg.layout(modules, rank, ("A", "B"))
    size = sum(a * b for _, (a, b) in entries)
    app = ClientApp()

    @app.train()
    def train(message, context):
        if secagg.is_protocol_step(message):
            return secagg.client_step(message, context)
        g = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
        state = {k: torch.randn(shape, generator=g) * 1e-3 for k, shape in entries}
        start = {k: torch.zeros(shape) for k, shape in entries}
        return secagg.train_reply(message, context, Upload(state=state), start,
                                  {"num-examples": 1, "train-loss": 1.0})

    settings = secagg.SecAggSettings(0, rank, ("A", "B"), 1.0, 0.0, bits)
    plain_up = recorddict_to_proto(RecordDict({"adapter": ArrayRecord(
        {k: torch.zeros(shape) for k, shape in entries})})).ByteSize()
    with InProcessGrid(app, clients) as grid:
        messages = [Message(RecordDict({"config": ConfigRecord({"round": 1})}),
                            dst_node_id=n, message_type=MessageType.TRAIN)
                    for n in grid.get_node_ids()]
        began = time.perf_counter()
        outcome = secagg.run_protocol(lambda batch: exchange(grid, batch, 600), messages, 1,
                                      0, 0, settings, size)
        wall = time.perf_counter() - began
    assert len(outcome.survivors) == clients and not outcome.dropped
    assert np.isfinite(settings.quantizer.dequantize_sum(outcome.total, clients)).all()
    return {"model": model, "entries": size, "clients": clients, "protocol_wall_s": wall,
            "seconds": outcome.seconds,
            "bytes_up_per_client": sum(outcome.bytes_up.values()) / clients,
            "bytes_down_per_client": sum(outcome.bytes_down.values()) / clients,
            "plain_bytes_up_per_client": plain_up}


def median_run(runs: list[dict]) -> dict:
    """One protocol run's record with the median wall and stage seconds of ``runs``."""
    stages = runs[0]["seconds"]
    return {**runs[0], "runs": len(runs),
            "protocol_wall_s": statistics.median(r["protocol_wall_s"] for r in runs),
            "seconds": {k: statistics.median(r["seconds"][k] for r in runs) for k in stages}}


def protocol_table(results: list[dict]) -> str:
    lines = ["| model (entries) | clients | protocol wall s (sequential) | of it, stage 0 "
             "(keys, quantise) s | bytes up / client (plain fp32 reply) | protocol bytes "
             "down / client |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} ({r['entries']:,}) | {r['clients']} | "
                     f"{r['protocol_wall_s']:.2f} | {r['seconds']['train']:.2f} | "
                     f"{r['bytes_up_per_client']:,.0f} ({r['plain_bytes_up_per_client']:,}) | "
                     f"{r['bytes_down_per_client']:,.0f} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = ["| clients | secure aggregation | train phase s / round | of it, stages after "
             "train s | "
             "bytes up / round | bytes down / round | final eval loss |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        loss = r["final_eval_loss"]
        lines.append(f"| {r['clients']} | {'SecAgg+' if r['secure'] else 'off'} | "
                     f"{r['train_phase_s']:.2f} | {r['protocol_s']:.2f} | "
                     f"{r['bytes_up_per_round']:,.0f} | {r['bytes_down_per_round']:,.0f} | "
                     f"{'-' if loss is None else f'{loss:.4f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="tiny")
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/secagg"))
    parser.add_argument("--protocol-only", metavar="MODEL", help="time the protocol alone "
                        "on MODEL's LoRA layout (e.g. smollm2), no training")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1,
                        help="protocol only: the median of this many runs per client count")
    args = parser.parse_args()
    if args.protocol_only:
        results = [median_run([protocol_only(args.protocol_only, ("q_proj", "v_proj"),
                                             args.rank, n) for _ in range(args.repeat)])
                   for n in args.clients]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"protocol-{args.protocol_only}.json").write_text(
            json.dumps(results, indent=2))
        print(protocol_table(results))
        return
    results = [one_run(args.scenario, n, args.rounds, secure, args.sets, args.out / "runs")
               for n in args.clients for secure in (False, True)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results-{args.scenario}.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
