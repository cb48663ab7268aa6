"""What embedding a fedtune client costs an application that already holds the model.

An app that has the base loaded (for inference) can lend it to ``fedtune.Client``
(``model=the_model``) or let fedtune load it again (``model="smollm2"``). Each variant
runs in a fresh process: the app loads SmolLM2-135M (fp32, as an app serving it would),
then ``train_local`` runs a few steps; the process's resident memory is sampled during
training. Printed: extra memory over the app's own footprint and seconds per step, and
the ratios of the two variants, measured in the same run.

    python benchmarks/bench_sdk.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, threading, time
import psutil
import fedtune
from fedtune.data import load_clients

variant, steps = sys.argv[1], int(sys.argv[2])
process = psutil.Process()
texts = load_clients("shakespeare", num_clients=1, min_lines=64, seed=0)[0].train[:200]
model, tokenizer = fedtune.load_model("smollm2")  # the app's own copy, fp32
time.sleep(0.5)
app_mb = process.memory_info().rss / 2**20
peak = [app_mb]
done = threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss / 2**20)
        time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()
if variant == "lend":
    client = fedtune.Client(texts, model=model, tokenizer=tokenizer, name="bench")
else:
    client = fedtune.Client(texts, model="smollm2", name="bench")
start = time.perf_counter()
result = client.train_local(steps=steps)
seconds = time.perf_counter() - start
done.set()
lora_left = any("lora" in n for n, _ in model.named_modules())
print(json.dumps({"variant": variant, "app_mb": app_mb, "extra_mb": peak[0] - app_mb,
                  "seconds": seconds, "steps": steps, "loss_before": result.eval_loss_before,
                  "loss_after": result.eval_loss_after, "lora_left_on_app_model": lora_left}))
"""


def run(variant: str, steps: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, variant, str(steps)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rows = [run(v, args.steps) for v in ("lend", "load")]
    print("| model= | app's own MB | extra MB while training | s (incl. load) | held-out "
          "loss before -> after | LoRA left on the app's model |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        label = ("the app's loaded model (lent)" if r["variant"] == "lend"
                 else '"smollm2" (loaded again, 4-bit)')
        print(f"| {label} | {r['app_mb']:.0f} | {r['extra_mb']:.0f} | {r['seconds']:.1f} | "
              f"{r['loss_before']:.4f} -> {r['loss_after']:.4f} | {r['lora_left_on_app_model']} |")
    lend, load = rows
    ratio = load["extra_mb"] / max(lend["extra_mb"], 1.0)
    print(f"\nextra memory, loaded again / lent: {ratio:.2f}x; time, loaded again / lent: "
          f"{load['seconds'] / lend['seconds']:.2f}x")


if __name__ == "__main__":
    main()
