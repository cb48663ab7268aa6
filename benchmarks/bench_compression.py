"""Traffic against quality: upload/download bytes and final held-out perplexity for
sparse uploads at several densities, with fp32 or int8 values, against the dense fp32
run of the same aggregator measured in the same invocation.

  python benchmarks/bench_compression.py [--scenario hetero] [--aggregators flora zeropad]
      [--densities 1.0 0.25 0.1 0.05] [--values fp32 int8] [--set run.rounds=2 ...]
      [--out benchmarks/compression]

Each configuration is one ``fedtune simulate`` in a fresh process; finished ones are kept
in ``<out>/results.json`` and skipped on a rerun, so an interrupted sweep resumes. The
table gives every ratio against the dense fp32 run of the same aggregator.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simrun import simulate_in_process


def run_one(scenario: str, aggregator: str, density: float, values: str, extra: list[str],
            out: Path) -> dict:
    sets = [f'federation.aggregator="{aggregator}"', f"compression.upload_density={density}",
            f'compression.upload_values="{values}"', f'compression.download_values="{values}"',
            f'run.name="{aggregator}-d{density}-{values}"', f'run.out_dir="{out / "runs"}"',
            *extra]
    done = simulate_in_process(scenario, sets)
    if "error" in done:
        return done
    run_dir, wall, summary = Path(done["run_dir"]), done["wall_s"], done["summary"]
    rounds = summary["rounds"]
    return {
        "run_dir": str(run_dir), "wall_s": wall,
        "final_perplexity": summary["final"]["eval_perplexity"],
        "initial_perplexity": summary["initial"].get("eval_perplexity"),
        "perplexities": [r["eval_perplexity"] for r in rounds],
        "bytes_up_per_round": summary["totals"]["bytes_up"] / len(rounds),
        "bytes_down_per_round": summary["totals"]["bytes_down"] / len(rounds),
        "bytes_up_dense_per_round": summary["totals"]["bytes_up_dense"] / len(rounds),
        "bytes_down_by_round": [r["bytes_down"] for r in rounds],
    }


def table(results: dict[str, dict], aggregators: list[str],
          baselines: dict[str, dict] | None = None) -> str:
    head = ("| aggregator | density | values | upload B / round | upload vs dense fp32 | "
            "download B / round (rounds >= 2) | final perplexity | vs dense |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = [head]
    for agg in aggregators:
        base = results.get(f"{agg}|1.0|fp32") or (baselines or {}).get(f"{agg}|1.0|fp32")
        for key, r in results.items():
            if not key.startswith(f"{agg}|") or "error" in r:
                continue
            _, density, values = key.split("|")
            down = r["bytes_down_by_round"][1:] or r["bytes_down_by_round"]
            up_ratio = ppl_change = "-"
            if base and "error" not in base:
                up_ratio = f"{base['bytes_up_per_round'] / r['bytes_up_per_round']:.1f}x fewer"
                change = r["final_perplexity"] / base["final_perplexity"] - 1
                ppl_change = f"{100 * change:+.2f} %"
            rows.append(f"| {agg} | {density} | {values} | {r['bytes_up_per_round']:,.0f} | "
                        f"{up_ratio} | {sum(down) / len(down):,.0f} | "
                        f"{r['final_perplexity']:.2f} | {ppl_change} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="hetero")
    parser.add_argument("--aggregators", nargs="+", default=["flora", "zeropad"])
    parser.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.25, 0.1, 0.05])
    parser.add_argument("--values", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--set", action="append", default=[], dest="extra")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/compression"))
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument("--baseline", type=Path,
                        help="results.json to take the dense fp32 rows from when --out has none")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    baselines = json.loads(args.baseline.read_text()) if args.baseline else None
    for agg in [] if args.table else args.aggregators:
        for density in args.densities:
            for values in args.values:
                key = f"{agg}|{density}|{values}"
                if key in results and "error" not in results[key]:
                    continue
                print(f"running {key} ...", flush=True)
                results[key] = run_one(args.scenario, agg, density, values, args.extra,
                                       args.out)
                store.write_text(json.dumps(results, indent=2))
                r = results[key]
                print(f"  {r.get('final_perplexity', r.get('error'))}  "
                      f"up {r.get('bytes_up_per_round', 0):,.0f} B/round  "
                      f"{r['wall_s']:.0f} s", flush=True)
    print(table(results, args.aggregators, baselines))


if __name__ == "__main__":
    main()
