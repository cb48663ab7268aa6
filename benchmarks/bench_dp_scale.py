"""Client-level DP where it is useful: how many clients per round it takes at epsilon 2, 4
and 8 for the final held-out perplexity to stay within 15 % of the same run without DP.

  python benchmarks/bench_dp_scale.py [--cohorts 100 300 1000] [--epsilons 2 4 8]
      [--aggregators ffa fedavg fedsb] [--rounds 5] [--population 5000]
      [--set KEY=VALUE ...] [--out benchmarks/dp_scale]
  python benchmarks/bench_dp_scale.py --report-only [--out benchmarks/dp_scale]
  python benchmarks/bench_dp_scale.py --real-only     # part 1 alone, no training

Part 1 (computation, no weights): for the real model of ``--real-scenario`` (SmolLM2-135M,
LoRA rank and target modules of ``simulations/privacy.toml``) d, the number of entries the
mechanism noises per round (counted by ``fedtune.privacy.mechanism.factor_release`` itself
on zero factors of the shapes the base model's config gives), the noise multiplier z from
fedtune's accountant for the target epsilon over ``--rounds`` releases at q = m / N, and the
noise-to-signal ratio z sqrt(d) / m for every aggregator x epsilon x cohort m x population N.

Part 2 (measured): the tiny config-built model (``model.source = "tiny"``, random weights)
on Shakespeare dealt IID to ``--population`` clients, through the in-process Grid (the real
round loop, strategy, DP wrapper and ClientApp). Per aggregator a one-round pilot without
clipping or noise gives the clip norm C (the mean update norm, as in bench_privacy.py; not
private, a stand-in for public or proxy data); then per cohort (smallest first, so a sweep
cut short has the cheap cohorts) one run without DP and one per target epsilon, each in a
fresh process. Cohorts below 100 (``--cohorts 10 30 100 300 1000``) cost little and put
runs on both sides of the 15 % line (at m = 100 the tiny model lost at most
1.1 % in the 2-round smoke test).
Every run is a line of ``<out>/results.jsonl`` as soon as it ends, a rerun
with the same settings skips what is there, and ``<out>/dp_scale.md`` is rewritten after
each run: final held-out perplexity, its ratio to the no-DP run, the server's reported
``dp_noise_to_signal`` beside each row, and the smallest configuration within 15 %.
DP runs are seeded experiments (``privacy.reproducible = true``: the sample and the noise
follow run.seed, so the norm statistics are published) with federated evaluation on.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import time
from pathlib import Path
from typing import Any

from bench_quality import load_rows, settings_key

RESULTS, REAL, REPORT = "results.jsonl", "real.jsonl", "dp_scale.md"
WITHIN = 1.15  # "within 15 % of the same run without DP"
#: the tiny federation a 1,000-client round of which takes ~1-2 min on one core: LoRA r=8
#: on q/v (as the real scenario), 4 AdamW steps per client and round at batch 8 of 32-token
#: sequences (AdamW's first steps make every update norm ~ lr x steps x sqrt(d), so the
#: pilot's C clips about half), 100 fixed held-out clients x 4 sequences, no generations
TINY_SETTINGS = [
    'model.source="tiny"', 'model.quantization="none"', 'model.device="cpu"',
    'data.partition="iid"', "data.max_samples_per_client=8", "data.seq_len=32",
    "data.max_eval_sequences=4", "lora.rank=8", "lora.alpha=16",
    "train.steps=4", "train.batch_size=8", "train.lr=5e-2",
    "federation.min_clients=1", "federation.eval_clients=100", "report.generations=0"]
#: what a pilot sets (bench_privacy's pilot): noise ~0, no clipping, norms published
PILOT_SETTINGS = [
    'privacy.mode="central"', "privacy.target_epsilon=0", "privacy.noise_multiplier=1e-12",
    "privacy.clip_norm=1e6", 'privacy.on_budget="stop"', "privacy.reproducible=true",
    "privacy.federated_eval=true", "run.rounds=1"]
#: LoRA variants for the "d by rank and target modules" table of the real model
RANKS = (4, 8, 16)
TARGET_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"))


# ---- part 1: d, z and z sqrt(d) / m without training -------------------------------------
def released_entries(source: str, targets: tuple[str, ...], rank: int, aggregator: str
                     ) -> tuple[int, bool]:
    """(d, offered): the entries the DP mechanism noises per round for ``aggregator``:
    for the factor form, counted by the mechanism's own release on zero factors of the
    base model's shapes (from its config, no weights); for the dense form, out x in per
    module. For an aggregator without a DP form (fedsb) d is what a release of its own
    payload (r x r per module) would noise, and offered is False."""
    import torch

    from fedtune.aggregation import capabilities_of, get_aggregator
    from fedtune.core.adapters import LoraFactors
    from fedtune.flower.replies import expected_modules
    from fedtune.privacy.mechanism import ClientLevelDP, factor_release
    from fedtune.privacy.noise import GaussianNoise
    from fedtune.privacy.wrapper import ClientLevelDPAggregator, DPSettings

    shapes = expected_modules(source, tuple(targets))
    form = capabilities_of(aggregator).dp_form
    if form is None:
        return rank * rank * len(shapes), False
    if form == "dense":
        return sum(i * o for i, o in shapes.values()), True
    zeros = {m: LoraFactors(A=torch.zeros(rank, i), B=torch.zeros(o, rank))
             for m, (i, o) in shapes.items()}
    settings = DPSettings("central", 1.0, 0.0, 0.5, 1e-5)
    trainable = ClientLevelDPAggregator(get_aggregator(aggregator), settings, 0).trainable
    release = factor_release([], zeros, ClientLevelDP(1.0, 0.0, 1.0), GaussianNoise(0),
                             trainable)
    return release.released, True


def delta_for(population: int, delta: float) -> float:
    """delta well below 1 / N: the given one, or 0.1 / N for a larger population."""
    return min(delta, 0.1 / population)


def noise_multiplier(epsilon: float, delta: float, rate: float, rounds: int) -> float | None:
    """z from fedtune's accountant (None: the target is out of reach)."""
    from fedtune.privacy import BudgetError, noise_multiplier_for

    try:
        return noise_multiplier_for(epsilon, delta, rate, rounds)
    except BudgetError:
        return None


def real_model(scenario: str) -> tuple[str, tuple[str, ...], int]:
    """(source, target modules, rank) of the real scenario's model."""
    from fedtune.config import load_scenario

    loaded = load_scenario(scenario, ['privacy.mode="none"'])
    return loaded.model.source, tuple(loaded.lora.target_modules), loaded.lora.rank


def real_noise(out: Path, populations: list[int], epsilons: list[float], cohorts: list[int],
               rounds: int, delta: float) -> list[dict[str, Any]]:
    """z for every (N, epsilon, m) at ``rounds`` releases, kept in ``real.jsonl`` (each z
    search costs seconds)."""
    path = out / REAL
    rows = read_jsonl(path)
    have = {(r["N"], r["rounds"], r["delta"], r["epsilon"], r["m"]) for r in rows}
    for n in populations:
        for epsilon in epsilons:
            for m in cohorts:
                key = (n, rounds, delta_for(n, delta), epsilon, m)
                if m >= n or key in have:
                    continue
                z = noise_multiplier(epsilon, key[2], m / n, rounds)
                row = dict(zip(("N", "rounds", "delta", "epsilon", "m"), key, strict=True))
                rows.append({**row, "q": m / n, "z": z})
                with path.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    return [r for r in rows if r["rounds"] == rounds and r["N"] in populations
            and r["epsilon"] in epsilons and r["m"] in cohorts
            and r["delta"] == delta_for(r["N"], delta)]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ratio(z: float | None, d: int, m: float) -> float | None:
    return None if z is None else z * math.sqrt(d) / m


def real_tables(model: tuple[str, tuple[str, ...], int], aggregators: list[str],
                rows: list[dict[str, Any]]) -> str:
    source, targets, rank = model
    ds = {a: released_entries(source, targets, rank, a) for a in aggregators}
    head = " | ".join(f"{a} z√d/m" + ("" if ds[a][1] else " (DP not offered)")
                      for a in aggregators)
    lines = [f"Model `{source}`, LoRA rank {rank} on {', '.join(targets)}: d = "
             + ", ".join(f"{a} {ds[a][0]:,}" + ("" if ds[a][1] else " (hypothetical)")
                         for a in aggregators) + ".", "",
             f"| N | delta | rounds | epsilon | m | q = m/N | z | {head} |",
             "|---|---|---|---|---|---|---|" + "---|" * len(aggregators)]
    for r in sorted(rows, key=lambda r: (r["N"], r["epsilon"], r["m"])):
        cells = [_num(ratio(r["z"], ds[a][0], r["m"]), 3) for a in aggregators]
        lines.append(f"| {r['N']:,} | {r['delta']:g} | {r['rounds']} | {r['epsilon']:g} | "
                     f"{r['m']:,} | {r['q']:.4g} | {_num(r['z'], 3)} | "
                     + " | ".join(cells) + " |")
    lines += ["", "d by rank and target modules (what the noise's norm grows with, as √d):", "",
              "| targets | rank | " + " | ".join(aggregators) + " |",
              "|---|---|" + "---|" * len(aggregators)]
    for t in TARGET_SETS:
        for r in RANKS:
            cells = [f"{released_entries(source, t, r, a)[0]:,}" for a in aggregators]
            lines.append(f"| {', '.join(t)} | {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    return "out of reach" if value is None else f"{value:.{digits}g}"


# ---- part 2: the tiny model's utility, measured -----------------------------------------
def job_sets(base: list[str], population: int, cohort: int, rounds: int, aggregator: str,
             kind: str, epsilon: float | None, clip: float | None, delta: float) -> list[str]:
    sets = [*base, f"data.num_clients={population}", f"federation.clients_per_round={cohort}",
            f"run.rounds={rounds}", f'federation.aggregator="{aggregator}"',
            f"privacy.delta={delta}", f'run.name="{aggregator}-m{cohort}-{kind}{epsilon or ""}"']
    if kind == "pilot":
        return [*sets, *PILOT_SETTINGS]
    if kind == "nodp":
        return [*sets, 'privacy.mode="none"']
    return [*sets, 'privacy.mode="central"', f"privacy.target_epsilon={epsilon}",
            f"privacy.clip_norm={clip}", "privacy.reproducible=true",
            "privacy.federated_eval=true"]


def summary_numbers(summary: dict[str, Any]) -> dict[str, Any]:
    """What the tables need from a run's summary.json."""
    rounds = summary["rounds"]
    privacy = summary.get("privacy") or {}
    replied = sum(r.get("clients_replied", 0) for r in rounds)
    train = sum(r.get("seconds_train_phase", 0.0) for r in rounds)
    return {
        "initial_perplexity": summary["initial"].get("eval_perplexity"),
        "perplexity": [r["eval_perplexity"] for r in rounds],
        "final_perplexity": summary["final"]["eval_perplexity"],
        "epsilon_spent": privacy.get("epsilon"), "z": privacy.get("noise_multiplier"),
        "clip_norm": privacy.get("clip_norm"), "delta": privacy.get("delta"),
        "sample_rate": privacy.get("sample_rate"),
        "noise_to_signal": [r.get("dp_noise_to_signal") for r in rounds],
        "update_norm_mean": [r.get("dp_update_norm_mean") for r in rounds],
        "clipped_fraction": [r.get("dp_clipped_fraction") for r in rounds],
        "sampled": [r.get("clients_sampled") for r in rounds],
        "replied": [r.get("clients_replied") for r in rounds],
        "round_seconds": [r.get("seconds") for r in rounds],
        "train_seconds_per_client": train / replied if replied else None,
    }


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One federation in this (fresh) process: its numbers, or why it failed."""
    import torch

    from fedtune.config import load_scenario
    from fedtune.flower.inprocess_grid import simulate_in_process

    torch.set_num_threads(job["threads"])
    row = {k: job[k] for k in ("key", "kind", "aggregator", "cohort", "epsilon")}
    start, cpu = time.perf_counter(), time.process_time()
    try:
        scenario = load_scenario(job["scenario"], job["sets"])
        run_dir = simulate_in_process(scenario, out_dir=job["runs_dir"])
        numbers = summary_numbers(json.loads((run_dir / "summary.json").read_text()))
    except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
        return {**row, "status": "failed", "reason": f"{type(err).__name__}: {err}"[-800:],
                "seconds": time.perf_counter() - start}
    if not job["keep_runs"]:
        shutil.rmtree(run_dir)
    return {**row, "status": "completed", **numbers, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def refusal(scenario: str, sets: list[str]) -> str | None:
    """Why the scenario refuses these settings (fedsb under DP), or None."""
    from fedtune.config import ConfigError, load_scenario

    try:
        load_scenario(scenario, sets)
    except ConfigError as err:
        return str(err)
    return None


def plan_jobs(args: argparse.Namespace) -> list[tuple[Any, ...]]:
    """(kind, aggregator, cohort, epsilon) in the order they run: cohort-major, smallest
    cohort first; each aggregator's pilot (at the smallest cohort) before its first run."""
    jobs: list[tuple[Any, ...]] = []
    for cohort in args.cohorts:
        for agg in args.aggregators:
            if cohort == args.cohorts[0]:
                jobs.append(("pilot", agg, cohort, None))
            jobs.append(("nodp", agg, cohort, None))
            jobs += [("dp", agg, cohort, e) for e in args.epsilons]
    return jobs


def pilot_clip(rows: list[dict[str, Any]], aggregator: str) -> float | None:
    pilot = next((r for r in rows if r["kind"] == "pilot" and r["aggregator"] == aggregator
                  and r["status"] == "completed"), None)
    return None if pilot is None else pilot["update_norm_mean"][0]


def refused(rows: list[dict[str, Any]], aggregator: str) -> str | None:
    """Why the scenario refused ``aggregator`` under DP (its pilot), or None."""
    return next((r["reason"] for r in rows if r["aggregator"] == aggregator
                 and r["status"] == "refused"), None)


def sweep(args: argparse.Namespace, key: str, sets: list[str], header: str) -> None:
    delta = delta_for(args.population, args.delta)
    rows = [r for r in load_rows(args.out) if r["key"] == key]
    done = {(r["kind"], r["aggregator"], r["cohort"], r["epsilon"]) for r in rows
            if r["status"] in ("completed", "refused")}
    todo = [j for j in plan_jobs(args) if j not in done]
    print(f"{len(todo)} runs to go ({len(done)} already in {args.out / RESULTS})", flush=True)
    context = multiprocessing.get_context("spawn")
    for kind, agg, cohort, epsilon in todo:
        clip = pilot_clip(rows, agg)
        if refused(rows, agg) or (kind == "dp" and clip is None) or (
                kind == "pilot" and clip is not None):
            continue  # no DP for this aggregator, its pilot failed, or one already ran
        job_set = job_sets(sets, args.population, cohort, args.rounds, agg, kind, epsilon,
                           clip, delta)
        row = {"key": key, "kind": kind, "aggregator": agg, "cohort": cohort,
               "epsilon": epsilon}
        reason = refusal(args.scenario, job_set) if kind != "nodp" else None
        if reason is not None:
            row = {**row, "status": "refused", "reason": reason}
        else:
            job = {**row, "scenario": args.scenario, "sets": job_set, "threads": args.threads,
                   "runs_dir": str(args.out / "runs"), "keep_runs": args.keep_runs}
            with context.Pool(1, maxtasksperchild=1) as pool:
                row = pool.apply(run_job, (job,))
        rows.append(row)
        with (args.out / RESULTS).open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(progress_line(row), flush=True)
        write_report(args, key, header)


def progress_line(row: dict[str, Any]) -> str:
    name = f"{row['aggregator']} m={row['cohort']} {row['kind']} {row['epsilon'] or ''}"
    if row["status"] != "completed":
        return f"{name}: {row['status']}: {row['reason'][-300:]}"
    return (f"{name}: final perplexity {row['final_perplexity']:.2f}, z√d/m "
            f"{row['noise_to_signal'][-1]}, {row['seconds'] / 60:.1f} min")


# ---- report -----------------------------------------------------------------------------
def tiny_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DP and no-DP rows with their ratio to the no-DP run of the same aggregator and m."""
    base = {(r["aggregator"], r["cohort"]): r for r in rows
            if r["kind"] == "nodp" and r["status"] == "completed"}
    out = []
    for r in rows:
        if r["kind"] == "pilot":
            continue
        ref = base.get((r["aggregator"], r["cohort"]))
        entry = {**r, "vs_nodp": None, "kept": None}
        if r["status"] == "completed" and ref is not None:
            entry["vs_nodp"] = r["final_perplexity"] / ref["final_perplexity"]
            gain = ref["initial_perplexity"] - ref["final_perplexity"]
            entry["kept"] = ((r["initial_perplexity"] - r["final_perplexity"]) / gain
                             if gain > 0 else None)
        out.append(entry)
    return sorted(out, key=lambda r: (r["aggregator"], r["cohort"], r["kind"] != "nodp",
                                      -(r["epsilon"] or 0)))


def tiny_table(rows: list[dict[str, Any]], pilots: dict[str, float | None]) -> str:
    lines = ["| aggregator | m | epsilon target (spent) | z | C | z√d/m (server) | final "
             "perplexity | vs no DP | no-DP gain kept | clipped | per round | min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "completed":
            lines.append(f"| {r['aggregator']} | {r['cohort']:,} | {r['epsilon']} | "
                         f"{r['status']}: {r['reason'][-160:]} | | | | | | | | |")
            continue
        lines.append(f"| {r['aggregator']} | {r['cohort']:,} | " + " | ".join(_cells(r))
                     + " |")
    pilot = ", ".join(f"{a} C = {c:.4g}" for a, c in pilots.items() if c is not None)
    return "\n".join(lines) + (f"\n\nClip norms from the pilots: {pilot}." if pilot else "")


def _cells(r: dict[str, Any]) -> list[str]:
    """A completed run's cells after aggregator and m (DP columns "-" without DP)."""
    curve = " / ".join(f"{p:.1f}" for p in r["perplexity"])
    clipped = [c for c in r["clipped_fraction"] if c is not None]
    tail = [f"{r['final_perplexity']:.2f}"]
    if r["kind"] != "dp":
        return ["none", "-", "-", "-", *tail, "-", "-", "-", curve, f"{r['seconds'] / 60:.1f}"]
    vs, kept = "-", "-"
    if r["vs_nodp"] is not None:
        vs = f"{100 * (r['vs_nodp'] - 1):+.1f} %" + (" ✓" if r["vs_nodp"] <= WITHIN else "")
    if r["kept"] is not None:
        kept = f"{100 * r['kept']:.0f} %"
    return [f"{r['epsilon']:g} ({r['epsilon_spent']:.2f})", _num(r["z"], 3),
            f"{r['clip_norm']:.3g}", f"{r['noise_to_signal'][-1]:.3g}", *tail, vs, kept,
            f"{sum(clipped) / len(clipped):.2f}" if clipped else "-", curve,
            f"{r['seconds'] / 60:.1f}"]


def smallest_within(rows: list[dict[str, Any]], d: dict[str, int]) -> list[str]:
    """Per aggregator and overall: the smallest cohort (then smallest epsilon, then
    smallest d) whose final perplexity is within 15 % of its no-DP run."""
    ok = [r for r in rows if r["kind"] == "dp" and r["vs_nodp"] is not None
          and r["vs_nodp"] <= WITHIN]
    order = sorted(ok, key=lambda r: (r["cohort"], r["epsilon"], d.get(r["aggregator"], 0)))
    lines = []
    for agg in sorted({r["aggregator"] for r in rows}):
        mine = [r for r in order if r["aggregator"] == agg]
        lines.append(f"- {agg}: " + (_config(mine[0]) if mine else "none within 15 % so far"))
    lines.append("- overall: " + (_config(order[0]) if order else "none within 15 % so far"))
    return lines


def _config(r: dict[str, Any]) -> str:
    return (f"m = {r['cohort']:,}, epsilon {r['epsilon']:g}: final perplexity "
            f"{r['final_perplexity']:.2f} ({100 * (r['vs_nodp'] - 1):+.1f} % vs no DP), "
            f"z√d/m = {r['noise_to_signal'][-1]:.3g}")


def bracket(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """The noise-to-signal ratios the measured runs put around the 15 % line: the largest
    of a run within it, the smallest of a run outside it (None: no such run)."""
    dp = [r for r in rows if r["kind"] == "dp" and r["vs_nodp"] is not None]
    good = [r["noise_to_signal"][-1] for r in dp if r["vs_nodp"] <= WITHIN]
    bad = [r["noise_to_signal"][-1] for r in dp if r["vs_nodp"] > WITHIN]
    return max(good, default=None), min(bad, default=None)


def bracket_lines(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[str]:
    """The bracket, and the real-model configurations at or below its lower end: the
    smallest cohort per aggregator, population and epsilon (a heuristic: the ratio bounds
    the noise against the largest possible signal, and the real model's own signal, the
    mean of its clients' updates, is not the tiny model's)."""
    good, bad = bracket(rows)
    if good is None and bad is None:
        return ["No DP run has finished yet."]
    lines = ["Noise to signal: " + "; ".join(
        part for part in (
            None if good is None else f"every measured run within 15 % had z√d/m <= {good:.3g}",
            None if bad is None else f"the smallest z√d/m of a run outside 15 % was {bad:.3g}")
        if part) + ".", ""]
    if good is None:
        return lines
    source, targets, rank = real_model(args.real_scenario)
    real = real_noise(args.out, args.real_populations, args.epsilons, args.real_cohorts,
                      args.rounds, args.delta)
    lines += [f"Real-model configurations (part 1) with z√d/m <= {good:.3g}, the smallest "
              "cohort per aggregator, population and epsilon:", ""]
    for agg in args.aggregators:
        d, offered = released_entries(source, targets, rank, agg)
        for n in args.real_populations:
            for epsilon in args.epsilons:
                fits = sorted(r["m"] for r in real if r["N"] == n and r["epsilon"] == epsilon
                              and (ratio(r["z"], d, r["m"]) or math.inf) <= good)
                if fits:
                    lines.append(f"- {agg}{'' if offered else ' (DP not offered)'}, N = {n:,}, "
                                 f"epsilon {epsilon:g}: m = {fits[0]:,}")
    return lines


def cost_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for cohort in sorted({r["cohort"] for r in rows}):
        mine = [r for r in rows if r["cohort"] == cohort and r["status"] == "completed"
                and r["kind"] != "pilot"]
        if not mine:
            continue
        per_client = [r["train_seconds_per_client"] for r in mine
                      if r["train_seconds_per_client"]]
        per_round = [s for r in mine for s in r["round_seconds"] if s]
        run = sum(r["seconds"] for r in mine) / len(mine)
        lines.append(f"- m = {cohort:,}: {len(mine)} runs, {run / 60:.1f} min per run, "
                     f"{sum(per_round) / len(per_round):.1f} s per round, train phase "
                     f"{sum(per_client) / len(per_client):.3f} s per client")
    return lines


def measured_model(args: argparse.Namespace) -> tuple[str, tuple[str, ...], int]:
    """(source, target modules, rank) of the measured runs."""
    from fedtune.config import load_scenario

    sets = job_sets(resolve_sets(args), args.population, args.cohorts[0], args.rounds,
                    "fedavg", "nodp", None, None, delta_for(args.population, args.delta))
    loaded = load_scenario(args.scenario, sets)
    return loaded.model.source, tuple(loaded.lora.target_modules), loaded.lora.rank


def latest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: the completed one if any (a rerun retries failed runs)."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        name = (r["kind"], r["aggregator"], r["cohort"], r["epsilon"])
        if name not in best or r["status"] != "failed":
            best[name] = r
    return list(best.values())


def write_report(args: argparse.Namespace, key: str, header: str) -> None:
    rows = latest([r for r in load_rows(args.out) if r["key"] == key])
    source, targets, rank = measured_model(args)
    d = {a: released_entries(source, targets, rank, a)[0] for a in args.aggregators}
    table = tiny_rows(rows)
    pilots = {a: pilot_clip(rows, a) for a in args.aggregators}
    refusals = [f"- {a}: refused under DP: {refused(rows, a)}" for a in args.aggregators
                if refused(rows, a)]
    text = "\n".join([
        "# Client-level DP at scale", "", header, "",
        "## 1. The real model: released entries d, noise multiplier z, z√d/m", "",
        real_section(args), "",
        f"## 2. The `{source}` model: utility measured", "",
        f"LoRA rank {rank} on {', '.join(targets)}: d = "
        + ", ".join(f"{a} {v:,}" for a, v in d.items())
        + f"; population N = {args.population:,}; delta = "
        f"{delta_for(args.population, args.delta):g}. `vs no DP`: final held-out perplexity "
        "over the no-DP run's of the same aggregator and cohort (✓: within 15 %); `no-DP "
        "gain kept`: how much of the no-DP run's drop from the base perplexity the DP run "
        "kept (15 % on perplexity is a loose bar where the whole gain is small).", "",
        tiny_table(table, pilots), "", *refusals, "",
        "### Smallest configuration within 15 % of its no-DP run", "",
        *smallest_within(table, d), "", *bracket_lines(args, table), "",
        "### Cost (this machine)", "", *cost_lines(rows), ""])
    (args.out / REPORT).write_text(text)


def real_section(args: argparse.Namespace) -> str:
    real = real_noise(args.out, args.real_populations, args.epsilons, args.real_cohorts,
                      args.rounds, args.delta)
    return ("z from fedtune's accountant (RDP, Poisson sampling at q = m/N) for the target "
            f"epsilon after {args.rounds} rounds; delta = min({args.delta:g}, 0.1/N). "
            "z√d/m is the noise's norm on the averaged update over the largest norm that "
            "average can have (C): above 1 the noise drowns every update.\n\n"
            + real_tables(real_model(args.real_scenario), args.aggregators, real))


# ---- command line -----------------------------------------------------------------------
def resolve_sets(args: argparse.Namespace) -> list[str]:
    return TINY_SETTINGS if args.sets is None else args.sets


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="tiny", help="scenario of the measured runs")
    parser.add_argument("--real-scenario", default="privacy",
                        help="scenario whose model and LoRA part 1 describes")
    parser.add_argument("--cohorts", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--aggregators", nargs="+", default=["ffa", "fedavg", "fedsb"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--population", type=int, default=5000,
                        help="N of the measured runs (q = m / N)")
    parser.add_argument("--real-populations", type=int, nargs="+",
                        default=[5000, 1_000_000], help="N of part 1's table")
    parser.add_argument("--real-cohorts", type=int, nargs="+",
                        default=[100, 300, 1000, 3000, 10000], help="m of part 1's table")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--set", dest="sets", action="append", default=None,
                        help=f"scenario override (default: {' '.join(TINY_SETTINGS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/dp_scale"))
    parser.add_argument("--keep-runs", action="store_true",
                        help="keep each run directory under <out>/runs")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--real-only", action="store_true", help="part 1 only")
    args = parser.parse_args()
    args.cohorts = sorted(args.cohorts)
    if any(m >= args.population for m in args.cohorts):
        parser.error(f"every cohort must be smaller than --population {args.population}")
    return args


def main() -> None:
    args = parse()
    sets = resolve_sets(args)
    key = settings_key(args.scenario, args.rounds,
                       [*sets, f"population={args.population}", f"delta={args.delta}"])
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"`{args.scenario}` model, {args.rounds} rounds, N = {args.population:,}, "
              f"cohorts {args.cohorts}, epsilons {args.epsilons}, --set {' '.join(sets)} "
              f"(settings {key})")
    if not (args.report_only or args.real_only):
        sweep(args, key, sets, header)
    if args.real_only:
        print(real_section(args))
        return
    write_report(args, key, header)
    print((args.out / REPORT).read_text())


if __name__ == "__main__":
    main()
