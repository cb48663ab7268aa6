"""Deployment overhead: what a round costs beyond local training, with Flower's default
(a fresh ClientApp process, imports and model load per message) and with fedtune's
long-lived worker, for the tiny model and SmolLM2 4-bit; and deployment against
simulation wall time for the same scenario. Real processes on localhost, measured in
one run (ratios, not absolute times, are what to compare).

    .venv/bin/python benchmarks/bench_deployment.py [--models tiny,smollm2] [--rounds 2]
        [--tls] [--modes per-message,long-lived,simulation]

``--tls``: TLS and node authentication on both sides (test certificates made in the run
folder), the way a real deployment runs; otherwise ``--insecure``.

``--modes flood``: the honest health probe's latency while an outsider floods the
clients' port (tests/deploy/test_flood.py's federation and attacks: 2,000 idle TLS
connections, 300 slow uploads, 64 stalled 64 MiB uploads), per phase, with the server's
peak memory; written to ``deployment/results-flood.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from simrun import simulate_in_process  # noqa: E402

from tests.deploy import harness as h  # noqa: E402

OUT = Path(__file__).parent / "deployment"
MODELS = {
    "tiny": h.TINY,
    "smollm2": ["model.source='smollm2'", "model.quantization='4bit'", "data.seq_len=64",
                "data.max_samples_per_client=48", "data.max_eval_sequences=4",
                "train.steps=3", "train.batch_size=2"],
}


def client_seconds(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per round: the slowest client's training and evaluation seconds (the round's
    critical path of client compute) and the mean adapter set-up seconds."""
    rounds: dict[int, dict[str, list[float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        r = rounds.setdefault(record["round"], {"train": [0.0], "eval": [0.0], "load": []})
        if record.get("phase") == "train":
            r["train"].append(record["seconds_train"])
            r["load"].append(record.get("seconds_load", 0.0))
        elif record.get("phase") == "eval":
            r["eval"].append(record.get("seconds_eval", 0.0))
    return {k: {"train_max": max(v["train"]), "eval_max": max(v["eval"]),
                "load_mean": statistics.mean(v["load"] or [0.0])} for k, v in rounds.items()}


def security(work: Path, tls: bool) -> tuple[list[str], list[str], list[list[str]]]:
    """(server sets, server flags, per-client flags) for an insecure or a TLS +
    node-authentication deployment of three clients."""
    if not tls:
        return [], ["--insecure"], [["--insecure"]] * 3
    from fedtune.deploy.certs import make_certificates

    made = make_certificates(work / "certs", nodes=3)
    allowed = work / "certs" / "allowed.pub"
    allowed.write_text("".join(p.read_text() for p in made.node_public_keys))
    sets = [f"server.ca_cert='{made.ca_cert}'", f"server.cert='{made.cert}'",
            f"server.key='{made.key}'", f"server.auth_keys='{allowed}'"]
    return sets, [], [["--root-certificates", str(made.ca_cert), "--auth-key", str(k)]
                      for k in made.node_keys]


def deployment(model: str, rounds: int, long_lived: bool, work: Path, tls: bool = False
               ) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    port = h.free_port()
    files = h.client_files(work / "data", 3)
    secure_sets, server_flags, client_flags = security(work, tls)
    sets = [*MODELS[model], "data.num_clients=3", f"run.rounds={rounds}",
            "federation.round_timeout=1200", *secure_sets]
    server = h.server(work, port, sets, server_flags)
    # h.server applies the tiny settings first; the model's own sets override them
    start = time.perf_counter()
    run_dir = h.run_dir_of(server)
    mode = [] if long_lived else ["--per-message-process"]
    # one thread per client, as the simulation gives each virtual client one CPU: three
    # clients share this machine here, where in a real deployment each has its own
    clients = [h.client(work, port, f, [*flags, *mode], env={"OMP_NUM_THREADS": "1"})
               for f, flags in zip(files, client_flags, strict=True)]
    try:
        code = server.wait(3600)
    finally:
        for c in clients:
            c.stop()
    wall = time.perf_counter() - start
    if code != 0:
        return {"error": server.output()[-2000:]}
    summary = h.summary(run_dir)
    per_client = client_seconds(run_dir)
    records = summary["rounds"]
    # beyond local compute: what the round costs besides the slowest client's training
    # and the slowest client's held-out evaluation
    overhead = [r["seconds"] - per_client[r["round"]]["train_max"]
                - per_client[r["round"]]["eval_max"] for r in records]
    return {"wall_s": wall, "round_s": [r["seconds"] for r in records],
            "overhead_s": overhead, "overhead_mean_s": statistics.mean(overhead),
            "train_max_s": [per_client[r["round"]]["train_max"] for r in records],
            "eval_max_s": [per_client[r["round"]]["eval_max"] for r in records],
            "client_setup_mean_s": [per_client[r["round"]]["load_mean"] for r in records],
            "final_eval_loss": summary["final"]["eval_loss"], "run_dir": str(run_dir)}


def simulation(model: str, rounds: int) -> dict:
    """The same scenario file and keys as the deployment, on Shakespeare partitions."""
    sets = [*h.TINY, *MODELS[model], "data.num_clients=3", f"run.rounds={rounds}",
            "data.source='shakespeare'", "data.min_lines=64",
            "run.out_dir='benchmarks/deployment/runs'", "federation.round_timeout=1200"]
    result = simulate_in_process(str(h.REPO / "server" / "server.toml"), sets)
    if "error" in result:
        return result
    records = result["summary"]["rounds"]
    return {"wall_s": result["wall_s"], "round_s": [r["seconds"] for r in records],
            "final_eval_loss": result["summary"]["final"]["eval_loss"]}


def flood(work: Path) -> dict:
    """The flooded federation of tests/deploy/test_flood.py, its probe per phase."""
    from fedtune.deploy.certs import make_certificates
    from tests.deploy.test_flood import _flooded

    work.mkdir(parents=True, exist_ok=True)
    made = make_certificates(work / "certs", nodes=3)
    allowed = work / "certs" / "allowed.pub"
    allowed.write_text("".join(p.read_text() for p in made.node_public_keys))
    run = _flooded(work, (made, allowed))
    phases = {}
    for name, phase in run["phases"].items():
        seconds = [s for s, _ in phase["probe"]]
        outcome = phase.get("outcome")
        phases[name] = {
            "probes": len(seconds), "probe_median_s": statistics.median(seconds),
            "probe_max_s": max(seconds),
            "probe_failed": sum(1 for _, c in phase["probe"] if c != 200),
            **({"attack_s": outcome["seconds"], "attacker_connections": outcome["opened"],
                "attacker_not_opened": outcome["not_opened"],
                "attacker_answers": dict(Counter(outcome["answers"]))}
               if outcome else {})}
    summary = h.summary(run["run_dir"])
    return {"exit_code": run["code"], "status": summary["status"],
            "rounds": [r["clients_replied"] for r in summary["rounds"]],
            "server_peak_mb": run["peak"] / 2**20, "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--modes", default="per-message,long-lived,simulation")
    args = parser.parse_args()
    modes = set(args.modes.split(","))
    OUT.mkdir(exist_ok=True)
    if "flood" in modes:
        result = flood(OUT / "runs" / "flood")
        print(json.dumps(result, indent=1), flush=True)
        (OUT / "results-flood.json").write_text(json.dumps(result, indent=2))
        return
    results = {}
    suffix = "-tls" if args.tls else ""
    for model in args.models.split(","):
        row = {}
        if "per-message" in modes:
            row["per_message_process"] = deployment(
                model, args.rounds, False, OUT / "runs" / f"{model}-per-message{suffix}",
                args.tls)
        if "long-lived" in modes:
            row["long_lived"] = deployment(model, args.rounds, True,
                                           OUT / "runs" / f"{model}-long{suffix}", args.tls)
        if "simulation" in modes:
            row["simulation"] = simulation(model, args.rounds)
        results[model] = row
        before, after = row.get("per_message_process"), row.get("long_lived")
        if before and after and "error" not in before and "error" not in after:
            print(f"{model}: overhead per round {before['overhead_mean_s']:.1f} s -> "
                  f"{after['overhead_mean_s']:.1f} s "
                  f"({before['overhead_mean_s'] / after['overhead_mean_s']:.1f}x); wall "
                  f"{before['wall_s']:.0f} s -> {after['wall_s']:.0f} s; simulation "
                  f"{row.get('simulation', {}).get('wall_s', float('nan')):.0f} s", flush=True)
        else:
            print(model, json.dumps(row, indent=1)[:3000], flush=True)
        (OUT / f"results{suffix}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
