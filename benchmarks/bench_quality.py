"""How well each aggregator learns over a horizon where they separate: one scenario, many
rounds, several seeds, every aggregator variant and the baselines; mean and spread of
the final held-out perplexity and of the per-round curve.

  python benchmarks/bench_quality.py [--scenario hetero] [--rounds 20] [--seeds 0 1 2]
      [--methods NAME ...] [--set KEY=VALUE ...] [--jobs 2] [--out benchmarks/quality]
  python benchmarks/bench_quality.py --report-only [--out benchmarks/quality]

Every (method, seed) run is appended to ``results.jsonl`` as soon as it ends, and a rerun
with the same settings skips what is there, so a sweep of hours survives an interrupted
session. Federated methods run on the in-process Grid (the real round loop, strategy and
ClientApp; held bit-identical to Flower's engine by tests/flower/test_simulation.py) and
the baselines through ``fedtune compare``'s own code (the client training session). The
report (``quality.md``, ``quality.png``) is rewritten after every run. Runs go
seed-major, so a sweep cut short still has every method for its first seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedtune.runs.compare import BASELINES, CENTRALISED, LOCAL, SAME_WALL

#: method -> (aggregator or baseline, federation keys it sets)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "flora (fresh)": ("flora", {"flora_init": "fresh"}),
    "flora (global)": ("flora", {"flora_init": "global"}),
    "zeropad (zeros)": ("zeropad", {"padding": "zeros"}),
    "zeropad (skip)": ("zeropad", {"padding": "skip"}),
    "hetlora (zeros)": ("hetlora", {"padding": "zeros"}),
    "hetlora (skip)": ("hetlora", {"padding": "skip"}),
    "flexlora": ("flexlora", {}),
    "fedavg": ("fedavg", {}),
    "ffa": ("ffa", {}),
    "fedsb": ("fedsb", {}),
    "lorafair": ("lorafair", {}),
    CENTRALISED: (CENTRALISED, {}),
    SAME_WALL: (SAME_WALL, {}),
    LOCAL: (LOCAL, {}),
}
#: a budget a 2-core CPU finishes in a few hours for every variant and three seeds: four of
#: the twelve clients sampled per round (cross-device style; every client still scores
#: each round), one optimizer step per client and round at its profile's batch, 32-token
#: sequences, four held-out sequences per client, no generations
CPU_SETTINGS = ["federation.clients_per_round=4", "federation.min_clients=4",
                "train.steps=1", "data.seq_len=32", "data.max_eval_sequences=4",
                "train.lr=2e-3", "report.generations=0"]
RESULTS, REPORT_MD, REPORT_PNG = "results.jsonl", "quality.md", "quality.png"


def settings_key(scenario: str, rounds: int, sets: list[str]) -> str:
    """Runs are reused only under the very same scenario, rounds and overrides."""
    text = json.dumps([scenario, rounds, sorted(sets)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def scenario_for(scenario: str, rounds: int, sets: list[str], method: str, seed: int):
    from fedtune.config import load_scenario
    from fedtune.runs.compare import with_aggregator

    loaded = load_scenario(scenario, [*sets, f"run.rounds={rounds}", f"run.seed={seed}"])
    aggregator, keys = VARIANTS[method]
    if aggregator not in BASELINES:
        loaded = with_aggregator(loaded, aggregator)
        loaded = replace(loaded, federation=replace(loaded.federation, **keys))
    return loaded


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One method under one seed: its per-round held-out perplexity, or why it failed."""
    import torch

    from fedtune.flower.inprocess_grid import simulate_in_process
    from fedtune.runs.compare import federated_result, run_baseline

    torch.set_num_threads(job["threads"])
    method, seed = job["method"], job["seed"]
    row = {"key": job["key"], "method": method, "seed": seed}
    start = time.perf_counter()
    try:
        scenario = scenario_for(job["scenario"], job["rounds"], job["sets"], method, seed)
        if VARIANTS[method][0] in BASELINES:
            result = run_baseline(VARIANTS[method][0], scenario, lambda event: None)
        else:
            run_dir = simulate_in_process(scenario, out_dir=job["runs_dir"])
            result = federated_result(method, run_dir)
    except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
        return {**row, "status": "failed", "reason": f"{type(err).__name__}: {err}"[-800:],
                "seconds": time.perf_counter() - start}
    return {**row, "status": result.status, "reason": result.reason,
            "seconds": time.perf_counter() - start,
            "perplexity": [r["eval_perplexity"] for r in result.rounds],
            "optimizer_steps": sum(r.get("optimizer_steps", 0) for r in result.rounds),
            "bytes_up": result.bytes_total("bytes_up"),
            "bytes_down": result.bytes_total("bytes_down")}


def load_rows(out: Path) -> list[dict[str, Any]]:
    path = out / RESULTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method over its completed seeds: final perplexity and the mean curve."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "completed" and row.get("perplexity"):
            by_method.setdefault(row["method"], []).append(row)
    matched = {r["seed"]: r["perplexity"][-1] for r in by_method.get(CENTRALISED, [])}
    table = {}
    for method, runs in by_method.items():
        finals = [r["perplexity"][-1] for r in runs]
        # each seed draws its own held-out set: compare within a seed, then average
        ratios = [r["perplexity"][-1] / matched[r["seed"]] for r in runs if r["seed"] in matched]
        curves = list(zip(*[r["perplexity"] for r in runs], strict=False))
        table[method] = {
            "seeds": sorted(r["seed"] for r in runs), "final": spread(finals),
            "final_min": min(finals), "final_max": max(finals),
            "vs_matched": spread(ratios) if ratios else (math.nan, math.nan),
            "curve": [spread(list(point)) for point in curves],
            "minutes": statistics.fmean(r["seconds"] for r in runs) / 60,
            "bytes_up_per_round": statistics.fmean(
                r["bytes_up"] / max(len(r["perplexity"]) - 1, 1) for r in runs),
        }
    return table


def render(table: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
           header: str) -> str:
    ordered = sorted(table, key=lambda m: table[m]["final"][0])
    rounds = max((len(t["curve"]) for t in table.values()), default=1) - 1
    ticks = sorted({0, 1, *range(5, rounds + 1, 5), rounds})
    lines = [header, "",
             "| method | seeds | final perplexity (mean ± sd) | min / max | / compute-matched "
             "centralised, same seed (mean ± sd) | " + " | ".join(f"r{t}" for t in ticks)
             + " | upload B / round | min / run |",
             "|---|---|---|---|---|" + "---|" * len(ticks) + "---|---|"]
    for method in ordered:
        t = table[method]
        mean, sd = t["final"]
        points = [f"{t['curve'][i][0]:.2f}" if i < len(t["curve"]) else "" for i in ticks]
        lines.append(
            f"| {method} | {len(t['seeds'])} | {mean:.2f} ± {sd:.2f} | "
            f"{t['final_min']:.2f} / {t['final_max']:.2f} | "
            f"{t['vs_matched'][0]:.3f} ± {t['vs_matched'][1]:.3f} | "
            + " | ".join(points) + f" | {t['bytes_up_per_round']:,.0f} | {t['minutes']:.1f} |")
    failed = [r for r in rows if r["status"] != "completed"]
    for r in failed:
        lines.append(f"\n- {r['method']} seed {r['seed']}: {r['status']}: {r.get('reason')}")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for method in sorted(table, key=lambda m: table[m]["final"][0]):
        means = [p[0] for p in table[method]["curve"]]
        sds = [p[1] for p in table[method]["curve"]]
        xs = list(range(len(means)))
        style = "--" if method in BASELINES else "-"
        ax.plot(xs, means, style, label=method)
        ax.fill_between(xs, [m - s for m, s in zip(means, sds, strict=True)],
                        [m + s for m, s in zip(means, sds, strict=True)], alpha=0.12)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out perplexity (mean over seeds, band = ±1 sd)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, key: str, header: str) -> None:
    rows = [r for r in load_rows(out) if r["key"] == key]
    table = summarise(rows)
    (out / REPORT_MD).write_text(render(table, rows, header))
    (out / "summary.json").write_text(json.dumps({"key": key, "methods": table}, indent=1))
    if table:
        plot(table, out / REPORT_PNG)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="hetero")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS),
                        choices=list(VARIANTS), metavar="METHOD")
    parser.add_argument("--set", dest="sets", action="append", default=None,
                        help=f"scenario override (default: {' '.join(CPU_SETTINGS)})")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/quality"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    sets = CPU_SETTINGS if args.sets is None else args.sets
    key = settings_key(args.scenario, args.rounds, sets)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"`{args.scenario}`, {args.rounds} rounds, seeds {args.seeds}, "
              f"--set {' '.join(sets)} (settings {key})")
    if args.report_only:
        write_report(args.out, key, header)
        print((args.out / REPORT_MD).read_text())
        return
    for method in args.methods:  # a setting no method can run under fails here, at once
        scenario_for(args.scenario, args.rounds, sets, method, args.seeds[0])
    done = {(r["method"], r["seed"]) for r in load_rows(args.out)
            if r["key"] == key and r["status"] == "completed"}
    jobs = [{"key": key, "scenario": args.scenario, "rounds": args.rounds, "sets": sets,
             "method": m, "seed": s, "threads": max(1, 2 // args.jobs),
             "runs_dir": str(args.out / "runs")}
            for s in args.seeds for m in args.methods if (m, s) not in done]
    print(f"{len(jobs)} runs to go ({len(done)} already in {args.out / RESULTS})", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(run_one, jobs):
            with (args.out / RESULTS).open("a") as f:
                f.write(json.dumps(row) + "\n")
            final = row.get("perplexity", [None])[-1]
            print(f"{row['method']} seed {row['seed']}: {row['status']} final {final} "
                  f"({row['seconds'] / 60:.1f} min)", flush=True)
            write_report(args.out, key, header)
    write_report(args.out, key, header)
    print((args.out / REPORT_MD).read_text())


if __name__ == "__main__":
    main()
