"""Simulator throughput and memory at 10, 100 and 1,000 clients, 10 sampled per round.

fedtune's simulator (base model cached per Ray worker, node -> partition mapping taken from
the engine, a fixed evaluation subset) against a plain Flower simulation of the same
workload whose ClientApp loads the model on every message (the FlowerTune pattern:
``get_model()`` inside the train function). Both run Flower's own simulation engine with
the same resources, data (IID shards of Shakespeare), LoRA, steps and rounds, each in a
fresh process; resident memory of the whole process tree (driver + Ray workers) is
sampled every 0.5 s. Printed: client updates per minute of the training phases, peak
memory, and the ratios, measured in the same run.

    python benchmarks/bench_scale.py --models tiny,smollm2 --clients 10,100,1000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

#: the plain Flower baseline: reloads the base model (and re-tokenises) on every message
BASELINE = r'''
import functools, json, sys, time
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from fedtune.config import load_scenario
from fedtune.data import clients_of, pack_texts
from fedtune.model.loading import load_base_model
from fedtune.model.lora import adapter_state, attach_lora, load_adapter_state
from fedtune.simulate import backend_config
from fedtune.train import train_local

scenario = load_scenario("tiny", json.loads(sys.argv[1]))
rounds, per_round = scenario.run.rounds, scenario.federation.clients_per_round
times = []

@functools.lru_cache(maxsize=1)
def partitions():  # the dataset is loaded once per worker, as FlowerTune's global does
    return clients_of(scenario.data, scenario.run.seed)

def get_model():
    base, tokenizer = load_base_model(scenario.model)
    return attach_lora(base, scenario.lora, scenario.run.seed), tokenizer

client = ClientApp()

@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    model, tokenizer = get_model()                     # every message, as FlowerTune does
    state = msg.content["arrays"].to_torch_state_dict()
    load_adapter_state(model, dict(state))
    data = partitions()[int(context.node_config["partition-id"])]
    blocks = pack_texts(data.train, tokenizer, scenario.data.seq_len)
    result = train_local(model, blocks, scenario.train, scenario.run.seed, "cpu")
    reply = RecordDict({"arrays": ArrayRecord(adapter_state(model)),
                        "metrics": MetricRecord({"num-examples": int(blocks.shape[0]),
                                                 "train-loss": float(result.loss)})})
    return Message(content=reply, reply_to=msg)

server = ServerApp()

@server.main()
def main(grid: Grid, context: Context) -> None:
    model, _ = get_model()
    strategy = FedAvg(fraction_train=per_round / scenario.data.num_clients,
                      min_train_nodes=per_round, fraction_evaluate=0.0,
                      min_available_nodes=scenario.data.num_clients)
    start = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter_state(model)),
                   num_rounds=rounds)
    times.append(time.perf_counter() - start)

run_simulation(server_app=server, client_app=client, num_supernodes=scenario.data.num_clients,
               backend_config=backend_config(scenario))
print(json.dumps({"train_seconds": times[0], "updates": rounds * per_round}))
'''

#: fedtune's own simulator on the same workload
FEDTUNE = r'''
import json, sys
from fedtune.config import load_scenario
from fedtune.simulate import simulate
scenario = load_scenario("tiny", json.loads(sys.argv[1]))
run_dir = simulate(scenario, out_dir=sys.argv[2])
rounds = json.loads((run_dir / "summary.json").read_text())["rounds"]
print(json.dumps({"train_seconds": sum(r["seconds_train_phase"] for r in rounds),
                  "updates": sum(r["clients_replied"] for r in rounds)}))
'''


def settings(model: str, clients: int, rounds: int) -> list[str]:
    common = [f"data.num_clients={clients}", "data.partition='iid'", "run.rounds=" + str(rounds),
              "federation.clients_per_round=10", "federation.min_clients=10",
              "federation.eval_clients=2", "federation.eval_every=1000"]
    if model == "tiny":
        return [*common, "train.steps=4"]
    return [*common, "model.source='smollm2'", "model.quantization='4bit'", "lora.rank=8",
            "lora.alpha=16", "data.seq_len=64", "train.steps=2", "train.batch_size=2",
            "data.max_eval_sequences=2"]


def tree_rss_mb(root: psutil.Process) -> float:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def measure(code: str, sets: list[str], out: Path) -> dict[str, float]:
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(sets), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               cwd=REPO)
    root, peak = psutil.Process(process.pid), [0.0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(root))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({process.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "peak_mb": peak[0], "wall_seconds": time.perf_counter() - start,
            "per_minute": 60.0 * result["updates"] / result["train_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-scale")
    args = parser.parse_args()
    print("| model | clients | fedtune updates/min | reload-per-message updates/min | ratio "
          "| fedtune peak MB | reload peak MB | fedtune wall s | reload wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for clients in (int(c) for c in args.clients.split(",")):
            sets = settings(model, clients, args.rounds)
            ours = measure(FEDTUNE, sets, Path(args.out))
            plain = measure(BASELINE, sets, Path(args.out))
            print(f"| {model} | {clients} | {ours['per_minute']:.1f} | {plain['per_minute']:.1f} "
                  f"| {ours['per_minute'] / plain['per_minute']:.2f}x | {ours['peak_mb']:.0f} "
                  f"| {plain['peak_mb']:.0f} | {ours['wall_seconds']:.0f} "
                  f"| {plain['wall_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
