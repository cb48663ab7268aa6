"""DP-SGD's utility on ``simulations/chat.toml`` for two versions of fedtune: an older
commit (exported with ``git archive``) against this checkout, same scenario, same seed,
seeded batches and noise (``privacy.reproducible = true``, so both runs draw the same
Poisson batches and the same noise and the comparison is paired).

Issue 30 changed DP-SGD's loss from transformers' batch-wide token mean to each
sequence's own token mean, summed; this measures what that did to the held-out loss
(assistant tokens) of the real bundled SmolLM2-135M-Instruct. Run:

    .venv/bin/python benchmarks/bench_dpsgd_chat.py --before 23b19dc~1
    .venv/bin/python benchmarks/bench_dpsgd_chat.py --before 23b19dc~1 --set run.rounds=1
    .venv/bin/python benchmarks/bench_dpsgd_chat.py --row-norms 12

``--row-norms`` prints, for client 0's first blocks at the initial LoRA, each block's
labelled tokens and the norm of its own loss's gradient: where every norm is above C,
clipping gives the two versions the same step (a row's old per-sample gradient was a
positive multiple of its new one), so their utility can only differ through rows below C.

Each run is a ``fedtune simulate`` (Ray, 3 clients); on a loaded 2-core machine one
2-round run took about 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DPSGD = ["privacy.sample_noise_multiplier=1.0", "privacy.sample_clip_norm=1.0",
         "privacy.reproducible=true", "report.generations=0"]


def export(ref: str, into: Path) -> Path:
    """The tree of ``ref`` under ``into`` (tracked files only)."""
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", ref], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def simulate(tree: Path, sets: list[str], out_dir: Path) -> dict[str, Any]:
    """One ``fedtune simulate -s chat`` importing fedtune from ``tree`` (also in the Ray
    workers, which inherit PYTHONPATH)."""
    cmd = [str(Path(sys.executable).with_name("fedtune")), "simulate", "-s", "chat"]
    for item in [*DPSGD, f'run.out_dir="{out_dir}"', *sets]:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"simulate in {tree} failed:\n{(proc.stderr or proc.stdout)[-2000:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_s": time.perf_counter() - start, "base": summary["initial"]["eval_loss"],
            "final": summary["final"]["eval_loss"],
            "train_loss": summary["rounds"][-1]["train_loss"],
            "epsilon": summary["rounds"][-1].get("sample_epsilon_max")}


def row_norms(rows: int) -> None:
    """Per-block labelled tokens and gradient norms (this checkout's per-sequence loss)."""
    import torch

    from fedtune.config import load_scenario
    from fedtune.data.tokenize import IGNORE_INDEX
    from fedtune.model.cache import get_peft_model
    from fedtune.model.lora import reset_lora
    from fedtune.train.batches import client_batch
    from fedtune.train.dpsgd import per_sequence_loss
    from fedtune.train.local import packed_inputs

    scenario = load_scenario("chat", ["model.device='cpu'"])
    model, _ = get_peft_model(scenario.model, scenario.lora, scenario.run.seed)
    reset_lora(model, scenario.run.seed)
    model.train()  # LoRA dropout on, as in training, seeded
    torch.manual_seed(scenario.run.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    data = client_batch(scenario, 0).train
    print("| block | labelled tokens | own loss | gradient norm |\n|---|---|---|---|")
    for i in range(min(rows, len(data))):
        block = data.rows(slice(i, i + 1))
        logits = model(**packed_inputs(block.input_ids, block.position_ids)).logits
        loss = per_sequence_loss(logits, block.labels).sum()
        norm = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).norm()
        labelled = int((block.labels[:, 1:] != IGNORE_INDEX).sum())
        print(f"| {i} | {labelled} | {float(loss.detach()):.3f} | {float(norm):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="git ref of the old version")
    parser.add_argument("--row-norms", type=int, default=0,
                        help="only print this many blocks' gradient norms")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="extra scenario override for both runs (repeatable)")
    args = parser.parse_args()
    if args.row_norms:
        row_norms(args.row_norms)
        return
    if not args.before:
        parser.error("--before REF is needed to compare two versions")
    with tempfile.TemporaryDirectory(prefix="bench-dpsgd-") as tmp:
        work = Path(tmp)
        rows = {"before": simulate(export(args.before, work), args.sets, work / "runs"),
                "after": simulate(ROOT, args.sets, work / "runs")}
    print("| version | held-out loss base -> final | change | last train loss | epsilon | wall |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['base']:.4f} -> {r['final']:.4f} | {r['final'] - r['base']:+.4f} "
              f"| {r['train_loss']:.4f} | {r['epsilon']:.2f} | {r['wall_s']:.0f} s |")


if __name__ == "__main__":
    main()
