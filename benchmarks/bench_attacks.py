"""One poisoned client of eight: held-out perplexity and backdoor success by method.

Runs ``simulations/default.toml`` (real SmolLM2-135M + Shakespeare, 8 role clients) as
``fedtune simulate`` processes, one per (attack, method): fedavg with the defaults before
issue 34 (no influence bound: ``median_norm_multiple = median_weight_multiple = 0``),
fedavg with the new default bound, geomedian and multikrum (their own defaults), and a
clean run (no attacker, fedavg, default bound). The backdoor's success rate: greedy
replies of the final adapter to ``--prompts`` held-out lines each followed by the
trigger line; a success is a reply that contains the target. Results go to
``benchmarks/attacks/results.json`` as each run ends (a rerun skips what is done);
``--table`` prints the markdown table.

    nice .venv/bin/python benchmarks/bench_attacks.py --attacks boost,backdoor
    .venv/bin/python benchmarks/bench_attacks.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simrun import simulate_in_process  # noqa: E402

OUT = Path(__file__).resolve().parent / "attacks" / "results.json"
SMALL = ["run.rounds=2", "train.steps=3", 'model.quantization="none"',
         "data.max_eval_sequences=4", "report.generations=0"]
METHODS = {
    "fedavg (no bound: before)": ['federation.aggregator="fedavg"',
                                  "federation.median_norm_multiple=0",
                                  "federation.median_weight_multiple=0"],
    "fedavg (default bound)": ['federation.aggregator="fedavg"'],
    "geomedian": ['federation.aggregator="geomedian"'],
    "multikrum": ['federation.aggregator="multikrum"'],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="boost,backdoor,sign_flip,noise")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--attacker", default="3", help="the malicious partition")
    parser.add_argument("--boost", type=float, default=10.0)
    parser.add_argument("--noise-norm", type=float, default=5.0)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], help="more section.key=value")
    parser.add_argument("--table", action="store_true")
    return parser.parse_args(argv)


def attack_sets(attack: str, args: argparse.Namespace) -> list[str]:
    if attack == "none":
        return []
    return [f'attack.kind="{attack}"', f'attack.clients="{args.attacker}"',
            f"attack.boost={args.boost}", f"attack.noise_norm={args.noise_norm}"]


def backdoor_success(sets: list[str], run_dir: str, prompts: int) -> float:
    """Fraction of held-out lines + trigger whose greedy reply contains the target."""
    import torch

    from fedtune.config import load_scenario
    from fedtune.model.lora import GLOBAL_ADAPTER, load_frozen_global
    from fedtune.runs.generations import _adapter_state, greedy_replies, held_out_prompts
    from fedtune.train.session import Trainee

    scenario = load_scenario("default", sets)
    model, tokenizer = Trainee.of(scenario).cached_model()
    a = scenario.attack
    lines = [p.text for _, p in held_out_prompts(scenario, tokenizer, prompts)]
    texts = [f"{line.rstrip()}\n{a.trigger}\n" for line in lines]
    active = list(model.active_adapters)
    load_frozen_global(model, _adapter_state(Path(run_dir)), scenario.lora)
    model.base_model.set_adapter([GLOBAL_ADAPTER])
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            replies = greedy_replies(model, tokenizer, texts, 16, scenario.data.seq_len)
    finally:
        model.base_model.set_adapter(active)
    return sum(a.target.lower()[:12] in r.lower() for r in replies) / max(1, len(replies))


def run_all(args: argparse.Namespace) -> None:
    results: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {}
    plan = [("none", "clean (no attacker)", METHODS["fedavg (default bound)"])]
    for attack in args.attacks.split(","):
        plan += [(attack, m, METHODS[m]) for m in args.methods.split(",")]
    for attack, method, method_sets in plan:
        key = f"{attack} | {method}"
        if key in results:
            continue
        sets = [*SMALL, *args.set, *method_sets, *attack_sets(attack, args)]
        print(f"running {key}", flush=True)
        run = simulate_in_process("default", sets)
        if "error" in run:
            results[key] = {"error": run["error"][-500:], "wall_s": run["wall_s"]}
        else:
            rounds = run["summary"]["rounds"]
            results[key] = {"perplexity": rounds[-1]["eval_perplexity"],
                            "per_round": [r["eval_perplexity"] for r in rounds],
                            "clipped": [r.get("influence_clipped") for r in rounds],
                            "wall_s": run["wall_s"], "sets": sets}
            if attack in ("backdoor", "none"):
                poisoned = sets if attack == "backdoor" else [*sets, *attack_sets(
                    "backdoor", args)]
                results[key]["backdoor_success"] = backdoor_success(
                    poisoned, run["run_dir"], args.prompts)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2))
        print(f"  {results[key]}", flush=True)


def table() -> None:
    results = json.loads(OUT.read_text())
    clean = results.get("none | clean (no attacker)", {}).get("perplexity")
    print("| attack | method | final perplexity | vs clean | per round | clipped per round "
          "| backdoor success | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        attack, method = key.split(" | ")
        if "error" in r:
            print(f"| {attack} | {method} | failed: {r['error'][-80:]!r} | | | | | |")
            continue
        rel = f"{100 * (r['perplexity'] / clean - 1):+.1f} %" if clean else "-"
        success = r.get("backdoor_success")
        print(f"| {attack} | {method} | {r['perplexity']:.2f} | {rel} | "
              f"{' -> '.join(f'{p:.1f}' for p in r['per_round'])} | {r['clipped']} | "
              f"{'-' if success is None else f'{success:.2f}'} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    arguments = parse_args()
    table() if arguments.table else run_all(arguments)
