"""Client-level DP at 100-1,000 clients per round on the real model, its noise emulated
with the few clients a 2-core machine can train per round.

  python benchmarks/bench_dp_emulated.py [--configs 8:100 8:300 4:300 ...] [--jobs 2]
      [--population 10000] [--set KEY=VALUE ...]
  python benchmarks/bench_dp_emulated.py --report-only

What DP costs a federation is the noise on the averaged update: std z C / m per entry,
z from the accountant for the target epsilon over R releases at q = m / N. A run of
``simulations/privacy.toml`` (SmolLM2, ffa, 8 of 16 clients per round, R = 3) with the
noise multiplier set to z_m x 8 / m adds exactly the noise a deployment of m clients per
round from N would add, so its held-out perplexity is what that deployment's DP costs
(McMahan et al., ICLR 2018, emulated large cohorts this way). It is pessimistic: the 8
clients' average carries more sampling noise than m's would. The emulated runs' own
epsilon is meaningless (z is tiny for q = 0.5); the table reports the target's. C is the
ffa pilot's mean update norm from ``benchmarks/bench_privacy.py`` (same settings), and the
run without DP is that benchmark's too: both are read from ``benchmarks/privacy/``.
Every run is a line of ``benchmarks/dp_scale/emulated.jsonl``; reruns skip what is done.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
from pathlib import Path
from typing import Any

from bench_dp_scale import noise_multiplier, released_entries, run_job

PRIVACY = Path("benchmarks/privacy/results.json")
OUT = Path("benchmarks/dp_scale/emulated.jsonl")
SCENARIO, AGGREGATOR, WITHIN = "privacy", "ffa", 1.15
#: bench_privacy's settings (its table's runs were made with these)
SETS = ['model.quantization="none"', f'federation.aggregator="{AGGREGATOR}"']


def scenario_facts(sets: list[str]) -> tuple[int, int, str, tuple[str, ...], int]:
    """(clients per round, rounds, model source, target modules, rank) of the runs."""
    from fedtune.config import load_scenario

    s = load_scenario(SCENARIO, [*sets, 'privacy.mode="none"'])
    return (s.federation.clients_per_round, s.run.rounds, s.model.source,
            tuple(s.lora.target_modules), s.lora.rank)


def emulated_sets(z_run: float, clip: float, sets: list[str]) -> list[str]:
    return [*sets, 'privacy.mode="central"', "privacy.target_epsilon=0",
            f"privacy.noise_multiplier={z_run}", f"privacy.clip_norm={clip}",
            'privacy.on_budget="stop"', "privacy.federated_eval=true"]


def plan(epsilon: float, cohort: int, args: argparse.Namespace, facts: tuple,
         clip: float) -> dict[str, Any]:
    """The emulated deployment's z (for R releases at q = m / N) and the run's z."""
    m_run, rounds, source, targets, rank = facts
    delta = min(args.delta, 0.1 / args.population)
    z = noise_multiplier(epsilon, delta, cohort / args.population, rounds)
    row = {"epsilon": epsilon, "m": cohort, "N": args.population, "delta": delta,
           "rounds": rounds, "z": z, "clip": clip, "sets": args.sets, "m_run": m_run}
    if z is None:
        return {**row, "status": "out of reach"}
    d, _ = released_entries(source, targets, rank, AGGREGATOR)
    return {**row, "z_run": z * m_run / cohort, "d": d,
            "noise_to_signal": z * math.sqrt(d) / cohort,
            "noise_std": z * clip / cohort}


def run_emulated(row: dict[str, Any]) -> dict[str, Any]:
    """One run of the real scenario with the emulated deployment's noise (fresh process)."""
    if row.get("status") == "out of reach":
        return row
    job = {"key": "emulated", "kind": "dp", "aggregator": AGGREGATOR, "cohort": row["m"],
           "epsilon": row["epsilon"], "scenario": SCENARIO, "threads": 1,
           "sets": emulated_sets(row["z_run"], row["clip"], row["sets"]),
           "runs_dir": str(OUT.parent / "runs"), "keep_runs": False}
    done = run_job(job)
    if done["status"] != "completed":
        return {**row, "status": done["status"], "reason": done["reason"]}
    return {**row, "status": "completed", "seconds": done["seconds"],
            **{k: done[k] for k in ("final_perplexity", "perplexity")}}


def report(rows: list[dict[str, Any]], no_dp: float) -> str:
    lines = ["| epsilon | clients per round m (of N) | z | z√d/m | noise std on the average "
             "| final perplexity | vs no DP | within 15 % |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["epsilon"], r["m"])):
        if r["status"] != "completed":
            lines.append(f"| {r['epsilon']:g} | {r['m']:,} ({r['N']:,}) | - | - | - | "
                         f"{r['status']} | - | - |")
            continue
        change = r["final_perplexity"] / no_dp
        lines.append(f"| {r['epsilon']:g} | {r['m']:,} ({r['N']:,}) | {r['z']:.3f} | "
                     f"{r['noise_to_signal']:.2f} | {r['noise_std']:.4f} | "
                     f"{r['final_perplexity']:.2f} | {100 * (change - 1):+.1f} % | "
                     f"{'yes' if change <= WITHIN else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+",
                        default=["8:100", "4:100", "2:100", "8:300", "4:300", "2:300", "8:1000"],
                        help="EPSILON:CLIENTS_PER_ROUND of the emulated deployments")
    parser.add_argument("--population", type=int, default=10_000)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=None)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.sets = args.sets if args.sets is not None else SETS
    earlier = json.loads(PRIVACY.read_text())
    clip = earlier[f"{AGGREGATOR}|pilot"]["update_norm_mean"][0]
    no_dp = earlier[f"{AGGREGATOR}|none"]["final_perplexity"]
    rows = ([json.loads(line) for line in OUT.read_text().splitlines()]
            if OUT.exists() else [])
    rows = [r for r in rows if r["N"] == args.population and r["sets"] == args.sets]
    done = {(r["epsilon"], r["m"]) for r in rows if r["status"] == "completed"}
    wanted = [(float(e), int(m)) for e, m in (c.split(":") for c in args.configs)]
    todo = [c for c in wanted if c not in done]
    if not args.report_only and todo:
        facts = scenario_facts(args.sets)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        planned = [plan(e, m, args, facts, clip) for e, m in todo]
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.jobs, maxtasksperchild=1) as pool:
            for row in pool.imap_unordered(run_emulated, planned):
                rows.append(row)
                with OUT.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(row["epsilon"], row["m"], row["status"], row.get("final_perplexity"),
                      flush=True)
    print(f"no DP: {no_dp:.2f}; C = {clip:.3g}")
    print(report([r for r in rows if (r["epsilon"], r["m"]) in wanted], no_dp))


if __name__ == "__main__":
    main()
