"""The simulator on a Ray cluster: client updates per minute on one node vs two, and the
memory of each node.

All nodes are on this machine (``tests/flower/ray_harness.py``: one ``ray start`` per node,
own temp dir, own process group), so two nodes cannot be faster than one with the same
CPUs: the ratio is the cost of going multi-node (a second raylet and its agents, objects
crossing between two object stores, the driver's connection to a remote node), not a
speed-up. Compared, with the same two CPUs and the same scenario:

* ``one node``: a cluster of a single head node with 2 CPUs, joined through
  ``simulation.ray_address``;
* ``two nodes``: a head with 1 CPU and a worker node with 1 CPU, joined the same way;
* ``private``: no address, the private Ray instance ``fedtune simulate`` starts by itself
  (2 CPUs), for reference.

Each run is one ``fedtune simulate`` in a fresh process (``simrun.simulate_in_process``);
configurations alternate, ``--repeats`` times. Updates per minute are counted over the
training phases (train + aggregate) of rounds 2.. (as ``bench_scale.py``), per run and per
round (the median over all rounds of all runs of a configuration is the figure compared:
other jobs share this machine, and a round is short enough to fall between them); end-to-end
wall time includes the process start, joining the cluster and the workers' first imports.
Resident memory is sampled every 0.2 s per node (its process group: Ray's own daemons,
and the ``ClientAppActor`` workers) and for the driver's process tree; peaks are printed.

    python benchmarks/bench_cluster.py --repeats 4                        # 6 rounds, 16 steps
    python benchmarks/bench_cluster.py --repeats 3 --steps 160 --rounds 4 --no-private
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "flower")]

from ray_harness import LocalRayCluster  # noqa: E402
from simrun import simulate_in_process  # noqa: E402

SETS = ["data.num_clients=8", "simulation.cpus_per_client=1"]


class Sampler:
    """Peak RSS per node (ray daemons / client workers) and of the driver's tree."""

    def __init__(self, cluster: LocalRayCluster | None) -> None:
        self.cluster = cluster
        self.peaks: dict[str, dict[str, float]] = {}
        self.driver_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _driver_tree_mb(self) -> float:
        total = 0.0
        me = psutil.Process()
        for proc in me.children(recursive=True):
            try:
                total += proc.memory_info().rss / 2**20
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.cluster is not None:
                for node in self.cluster.nodes:
                    now = node.rss_mb()
                    peak = self.peaks.setdefault(node.name, {"ray": 0.0, "workers": 0.0})
                    for key, value in now.items():
                        peak[key] = max(peak[key], value)
            self.driver_mb = max(self.driver_mb, self._driver_tree_mb())
            self._stop.wait(0.2)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_run(name: str, cluster: LocalRayCluster | None, sets: list[str]) -> dict[str, Any]:
    address = cluster.address if cluster is not None else ""
    load = os.getloadavg()[0]
    with Sampler(cluster) as sampler:
        result = simulate_in_process("tiny", [*SETS, *sets,
                                              f"simulation.ray_address='{address}'"])
    if "error" in result:
        raise RuntimeError(f"{name}: {result['error']}")
    rounds = result["summary"]["rounds"]
    later = rounds[1:]
    seconds = sum(r["seconds_train_phase"] + r["seconds_aggregate"] for r in later)
    updates = sum(r["clients_replied"] for r in later)
    per_round = [60 * r["clients_replied"] / (r["seconds_train_phase"] + r["seconds_aggregate"])
                 for r in later]
    records = [json.loads(x) for x in
               (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    per_node: dict[str, int] = {}
    for record in records:
        if record["phase"] == "train":
            key = str(record.get("ray_node_id", "?"))[:8]
            per_node[key] = per_node.get(key, 0) + 1
    return {"config": name, "updates_per_min": 60 * updates / seconds,
            "round_rates": per_round, "load_before": load,
            "all_updates": sum(r["clients_replied"] for r in rounds),
            "wall_s": result["wall_s"], "nodes_used": per_node,
            "node_peak_mb": sampler.peaks, "driver_tree_peak_mb": sampler.driver_mb,
            "client_peak_rss_mb": max(r.get("peak_memory_mb", 0.0) for r in records)}


def start(cpus: list[int]) -> LocalRayCluster:
    cluster = LocalRayCluster()
    try:
        cluster.start_head(cpus=cpus[0])
        for n in cpus[1:]:
            cluster.add_worker(cpus=n)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=16, help="train.steps per client")
    parser.add_argument("--no-private", action="store_true",
                        help="skip the private-instance reference runs")
    args = parser.parse_args()
    sets = [f"run.rounds={args.rounds}", f"train.steps={args.steps}"]
    one, two = start([2]), start([1, 1])
    results: list[dict[str, Any]] = []
    try:
        for _ in range(args.repeats):
            for name, cluster in (("one node (2 CPUs)", one), ("two nodes (1 + 1 CPUs)", two),
                                  ("private instance (2 CPUs)", None)):
                if cluster is None and args.no_private:
                    continue
                results.append(one_run(name, cluster, sets))
                print(json.dumps(results[-1]), flush=True)
                time.sleep(2)
    finally:
        one.stop()
        two.stop()
    print(f"\n{' '.join(SETS + sets)}")
    print("\n| configuration | updates / min: median of rounds (quartiles) | per run "
          "| end-to-end s (median) | driver MB |")
    print("|---|---|---|---|---|")
    names = list(dict.fromkeys(r["config"] for r in results))
    medians = {}
    for name in names:
        mine = [r for r in results if r["config"] == name]
        pooled = sorted(x for r in mine for x in r["round_rates"])
        q1, medians[name], q3 = statistics.quantiles(pooled, n=4)
        runs = ", ".join(f"{r['updates_per_min']:.0f}" for r in mine)
        print(f"| {name} | {medians[name]:.0f} ({q1:.0f}-{q3:.0f}) | {runs} "
              f"| {statistics.median(r['wall_s'] for r in mine):.1f} "
              f"| {max(r['driver_tree_peak_mb'] for r in mine):.0f} |")
    loads = ", ".join(f"{r['load_before']:.1f}" for r in results)
    print(f"\ntwo nodes / one node: {medians[names[1]] / medians[names[0]]:.2f}; load average "
          f"before each run: {loads}")
    print("\n| configuration | node | Ray daemons MB | client workers MB |")
    print("|---|---|---|---|")
    for name in names[:2]:
        mine = [r for r in results if r["config"] == name]
        for node in mine[0]["node_peak_mb"]:
            ray_mb = max(r["node_peak_mb"][node]["ray"] for r in mine)
            workers = max(r["node_peak_mb"][node]["workers"] for r in mine)
            print(f"| {name} | {node} | {ray_mb:.0f} | {workers:.0f} |")


if __name__ == "__main__":
    main()
