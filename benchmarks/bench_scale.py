"""Simulator throughput and memory at 10, 100 and 1,000 clients, 10 sampled per round.

fedtune's simulator (base model cached per Ray worker, node -> partition mapping taken
from the engine, a fixed evaluation subset) against a plain Flower simulation of the same
workload whose ClientApp loads the model on every message (the FlowerTune pattern,
``benchmarks/flowertune_baseline.py``). Both run Flower's simulation engine with the same
resources, data (IID shards of Shakespeare), LoRA, steps and rounds, each in a fresh
process; resident memory of the whole process tree (driver + Ray workers) is sampled every
0.5 s. Printed: client updates per minute over the training phases of rounds 2.. (round 1
of the baseline also pays each Ray worker's first imports), peak memory, and the ratios,
measured in the same run.

    python benchmarks/bench_scale.py --models tiny,smollm2 --clients 10,100,1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

#: fedtune's own simulator on the same workload
FEDTUNE = r'''
import json, sys
from fedtune.config import load_scenario
from fedtune.runs.simulate import simulate
scenario = load_scenario("tiny", json.loads(sys.argv[1]))
run_dir = simulate(scenario, out_dir=sys.argv[2])
rounds = json.loads((run_dir / "summary.json").read_text())["rounds"][1:]  # as the baseline
print(json.dumps({"train_seconds": sum(r["seconds_train_phase"] + r["seconds_aggregate"]
                                       for r in rounds),
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


def measure(code: str | None, sets: list[str], out: Path) -> dict[str, float]:
    """Run fedtune (``code``) or, with None, the baseline module, in a fresh process."""
    start = time.perf_counter()
    command = ([sys.executable, "-c", code, json.dumps(sets), str(out)] if code is not None
               else [sys.executable, "-c", "import flowertune_baseline as b; b.run()"])
    env = {**os.environ, "FEDTUNE_BENCH_SETS": json.dumps(sets),
           "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(REPO)])}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, cwd=REPO, env=env)
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-scale")
    args = parser.parse_args()
    print("| model | clients | fedtune updates/min | reload-per-message updates/min | ratio "
          "| fedtune peak MB | reload peak MB | fedtune wall s | reload wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for clients in (int(c) for c in args.clients.split(",")):
            sets = settings(model, clients, args.rounds)
            ours = measure(FEDTUNE, sets, Path(args.out))
            plain = measure(None, sets, Path(args.out))
            print(f"| {model} | {clients} | {ours['per_minute']:.1f} | {plain['per_minute']:.1f} "
                  f"| {ours['per_minute'] / plain['per_minute']:.2f}x | {ours['peak_mb']:.0f} "
                  f"| {plain['peak_mb']:.0f} | {ours['wall_seconds']:.0f} "
                  f"| {plain['wall_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
