"""Foundation measurements, each a ratio against a baseline taken in the same run.

  python benchmarks/bench_foundation.py load      # first (GGUF) load vs cached load
  python benchmarks/bench_foundation.py memory    # peak client memory: 4-bit vs fp32 base
  python benchmarks/bench_foundation.py round RUN_DIR   # per-round time breakdown of a run

Every measurement runs in a fresh subprocess so one does not warm the other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

LOAD_SNIPPET = """
import time, json, sys
t0 = time.perf_counter()
from fedtune.model.loading import ModelSpec, load_base_model
t1 = time.perf_counter()
model, tok = load_base_model(ModelSpec(source="smollm2", quantization="none", device="cpu"))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""

MEMORY_SNIPPET = """
import json, sys, torch
from fedtune.model.device import current_rss_mb, peak_memory_mb
from fedtune.model.loading import ModelSpec
from fedtune.model.lora import LoraSpec
from fedtune.model.cache import get_peft_model
from fedtune.train import TrainConfig, train_local
rss0 = current_rss_mb()
spec = ModelSpec(source="smollm2", quantization=sys.argv[1], device="cpu")
model, tok = get_peft_model(spec, LoraSpec(rank=8, alpha=16), seed=0)
rss_loaded = current_rss_mb()
footprint = model.get_memory_footprint() / 2**20
seqs = torch.randint(0, 49152, (16, 128))
res = train_local(model, seqs, TrainConfig(steps=3, batch_size=4), seed=0,
                  device=torch.device("cpu"))
print(json.dumps({"footprint_mb": footprint, "rss_before_mb": rss0, "rss_loaded_mb": rss_loaded,
                  "peak_rss_mb": peak_memory_mb(torch.device("cpu")),
                  "step_s": res.seconds / res.steps}))
"""


def _run(snippet: str, *args: str, env: dict | None = None) -> dict:
    import os

    full_env = dict(os.environ, **(env or {}))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(snippet), *args], env=full_env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_load() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {"FEDTUNE_CACHE": cache}
        first = _run(LOAD_SNIPPET, env=env)
        cached = [_run(LOAD_SNIPPET, env=env) for _ in range(3)]
    best = min(c["load_s"] for c in cached)
    print("| load | seconds |\n|---|---|")
    print(f"| first (GGUF -> fp32 folder, cached) | {first['load_s']:.2f} |")
    print(f"| cached folder (best of 3) | {best:.2f} |")
    print(f"| ratio first / cached | {first['load_s'] / best:.1f}x |")


def bench_memory() -> None:
    rows = {q: _run(MEMORY_SNIPPET, q) for q in ("none", "8bit", "4bit")}
    print("| base | tensor footprint MB | RSS after load MB | peak RSS (3 train steps) MB "
          "| s / step |\n|---|---|---|---|---|")
    for q, r in rows.items():
        print(f"| {q} | {r['footprint_mb']:.0f} | {r['rss_loaded_mb']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['step_s']:.2f} |")
    for q in ("8bit", "4bit"):
        base = rows["none"]
        print(f"ratio {q}/fp32: footprint {rows[q]['footprint_mb'] / base['footprint_mb']:.2f}"
              f", peak RSS {rows[q]['peak_rss_mb'] / base['peak_rss_mb']:.2f}")


def bench_round(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    print("| round | wall s | train phase s | client load s | client train s | "
          "client serialise s | aggregate s | eval phase s | up MB | down MB | held-out loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary["rounds"]:
        print(f"| {r['round']} | {r['seconds']:.1f} | {r['seconds_train_phase']:.1f} | "
              f"{r.get('client_seconds_load_mean', 0):.2f} | "
              f"{r.get('client_seconds_train_mean', 0):.1f} | "
              f"{r.get('client_seconds_codec_mean', 0):.3f} | {r['seconds_aggregate']:.3f} | "
              f"{r['seconds_eval_phase']:.1f} | {r['bytes_up'] / 2**20:.2f} | "
              f"{r['bytes_down'] / 2**20:.2f} | {r['eval_loss']:.4f} |")
    print(f"initial held-out loss {summary['initial']['eval_loss']:.4f}, "
          f"final {summary['final']['eval_loss']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["load", "memory", "round"])
    parser.add_argument("run_dir", nargs="?", type=Path)
    args = parser.parse_args()
    if args.what == "load":
        bench_load()
    elif args.what == "memory":
        bench_memory()
    else:
        if args.run_dir is None:
            parser.error("round needs a RUN_DIR")
        bench_round(args.run_dir)


if __name__ == "__main__":
    main()
