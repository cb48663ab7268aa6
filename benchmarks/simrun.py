"""One ``fedtune simulate`` in a fresh process, as the benchmark sweeps run it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def simulate_in_process(scenario: str, sets: list[str]) -> dict[str, Any]:
    """{"run_dir", "wall_s", "summary"}, or {"error", "wall_s"} when the run failed."""
    cmd = [str(Path(sys.executable).with_name("fedtune")), "simulate", "-s", scenario]
    for item in sets:
        cmd += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "wall_s": wall}
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    return {"run_dir": str(run_dir), "wall_s": wall,
            "summary": json.loads((run_dir / "summary.json").read_text())}
