"""Utility against privacy: final held-out perplexity of client-level DP runs at several
target epsilons, against the run without DP of the same aggregator, measured in the same
invocation on the real bundled model and Shakespeare.

  python benchmarks/bench_privacy.py [--scenario privacy] [--aggregators ffa fedavg]
      [--epsilons 8 4 1] [--set model.quantization="none" ...] [--out benchmarks/privacy]

Per aggregator the clip norm C comes first from a one-round pilot with negligible noise
and no clipping (C = the mean update norm it reports; see docs/privacy.md, "Choosing C":
a pilot like this is not private, in practice it runs on public or proxy data). Then one
run without DP and one per target epsilon, each ``fedtune simulate`` in a fresh process;
finished runs are kept in ``<out>/results.json`` and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simrun import simulate_in_process


def simulate(scenario: str, sets: list[str]) -> dict:
    """The numbers of one run that the table needs."""
    done = simulate_in_process(scenario, sets)
    if "error" in done:
        return done
    run_dir, wall, summary = done["run_dir"], done["wall_s"], done["summary"]
    rounds = summary["rounds"]
    privacy = summary.get("privacy") or {}
    return {
        "run_dir": str(run_dir), "wall_s": wall,
        "final_perplexity": summary["final"]["eval_perplexity"],
        "initial_perplexity": summary["initial"].get("eval_perplexity"),
        "perplexities": [r["eval_perplexity"] for r in rounds],
        "epsilon": privacy.get("epsilon"), "noise_multiplier": privacy.get("noise_multiplier"),
        "clip_norm": privacy.get("clip_norm"), "delta": privacy.get("delta"),
        "sample_rate": privacy.get("sample_rate"),
        "noise_std": rounds[-1].get("dp_noise_std"),
        "update_norm_mean": [r.get("dp_update_norm_mean") for r in rounds],
        "clipped_fraction": [r.get("dp_clipped_fraction") for r in rounds],
    }


def pilot_clip_norm(scenario: str, aggregator: str, extra: list[str], out: Path) -> dict:
    """Mean client update norm in one round with no clipping and negligible noise."""
    return simulate(scenario, [
        f'federation.aggregator="{aggregator}"', 'privacy.mode="central"',
        "privacy.target_epsilon=0", "privacy.noise_multiplier=1e-12", "privacy.clip_norm=1e6",
        'privacy.on_budget="stop"', "run.rounds=1", f'run.name="{aggregator}-pilot"',
        # norm statistics are published only in a reproducible experiment
        "privacy.reproducible=true", "privacy.federated_eval=true",
        f'run.out_dir="{out / "runs"}"', *extra])


def run_one(scenario: str, aggregator: str, epsilon: float | None, clip: float,
            extra: list[str], out: Path) -> dict:
    name = f"{aggregator}-eps{epsilon}" if epsilon else f"{aggregator}-nodp"
    privacy = (['privacy.mode="none"'] if epsilon is None else
               [f"privacy.target_epsilon={epsilon}", f"privacy.clip_norm={clip}",
                "privacy.federated_eval=true"])  # utility is measured: an experiment
    return simulate(scenario, [f'federation.aggregator="{aggregator}"', *privacy,
                               f'run.name="{name}"', f'run.out_dir="{out / "runs"}"', *extra])


def released_entries(run_dir: str, aggregator: str) -> int:
    """d: how many factor entries the mechanism noises (ffa: B only; A is frozen)."""
    from safetensors.torch import load_file

    tensors = load_file(Path(run_dir) / "adapter" / "adapter_model.safetensors")
    return sum(t.numel() for k, t in tensors.items()
               if "lora_B" in k or aggregator != "ffa")


def table(results: dict[str, dict], aggregators: list[str]) -> str:
    """Per aggregator and target: what was spent, the noise, and perplexity vs no DP.
    ``noise / signal`` = z sqrt(d) / m: the norm of the noise on the average over the
    largest norm the average of clipped updates can have (C)."""
    rows = ["| aggregator | target epsilon | epsilon spent (delta) | z | C | noise std on the "
            "average | noise / signal | final perplexity | vs no DP |",
            "|---|---|---|---|---|---|---|---|---|"]
    for agg in aggregators:
        base = results.get(f"{agg}|none")
        for key, r in results.items():
            if not key.startswith(f"{agg}|") or key.endswith("|pilot") or "error" in r:
                continue
            target = key.split("|")[1]
            change = "-"
            if base and "error" not in base and target != "none":
                change = f"{100 * (r['final_perplexity'] / base['final_perplexity'] - 1):+.1f} %"
            spent = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f} ({r['delta']:g})"
            z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
            clip = "-" if r["clip_norm"] is None else f"{r['clip_norm']:.3g}"
            std = "-" if r["noise_std"] is None else f"{r['noise_std']:.4f}"
            ratio = "-"
            if r["noise_multiplier"] is not None and r["clip_norm"]:
                d = released_entries(r["run_dir"], agg)
                ratio = f"{r['noise_std'] * d ** 0.5 / r['clip_norm']:.1f}"
            rows.append(f"| {agg} | {target} | {spent} | {z} | {clip} | {std} | {ratio} | "
                        f"{r['final_perplexity']:.2f} | {change} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="privacy")
    parser.add_argument("--aggregators", nargs="+", default=["ffa", "fedavg"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 4.0, 1.0])
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--out", default="benchmarks/privacy")
    parser.add_argument("--table", action="store_true", help="print the table and exit")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    if not args.table:
        for agg in args.aggregators:
            jobs = [("pilot", None), ("none", None), *((str(e), e) for e in args.epsilons)]
            for label, epsilon in jobs:
                key = f"{agg}|{label}"
                if key in results and "error" not in results[key]:
                    continue
                if label == "pilot":
                    results[key] = pilot_clip_norm(args.scenario, agg, args.sets, out)
                else:
                    clip = results[f"{agg}|pilot"]["update_norm_mean"][0]
                    results[key] = run_one(args.scenario, agg, epsilon, clip, args.sets, out)
                path.write_text(json.dumps(results, indent=2))
                r = results[key]
                print(f"{key}: " + (r["error"][-300:] if "error" in r else
                                    f"perplexity {r['final_perplexity']:.2f} "
                                    f"epsilon {r['epsilon']} ({r['wall_s']:.0f} s)"), flush=True)
    print(table(results, args.aggregators))


if __name__ == "__main__":
    main()
