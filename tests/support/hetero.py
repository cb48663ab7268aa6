"""simulations/hetero.toml on the tiny model, and the one comparison of every aggregator
on it that tests/test_compare.py and tests/flower/test_hetero.py share (the session
fixture ``hetero_comparison`` in tests/conftest.py runs it once)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.config import Scenario, load_scenario

#: tiny config-built model, short sequences, two rounds, six clients (the scenario's
#: minimum; every one of the four profiles still has a client): seconds per run
CLIENTS = 6
TINY = ['model.source="tiny"', "model.device=\"cpu\"", "run.rounds=2", "train.steps=4",
        f"data.num_clients={CLIENTS}",
        "train.lr=5e-3", "data.seq_len=32", "data.max_samples_per_client=48",
        "data.max_eval_sequences=8", "report.generations=0"]
#: what the comparison's table records as the command that made it
COMMAND = "pytest tests/test_compare.py"


def hetero(aggregator: str | None = None, *extra: str) -> Scenario:
    chosen = [f'federation.aggregator="{aggregator}"'] if aggregator else []
    return load_scenario("hetero", [*TINY, *chosen, *extra])


@dataclass
class Comparison:
    """The comparison folder, its comparison.json, and the scenario it ran."""

    scenario: Scenario
    aggregators: list[str]
    folder: Path
    report: dict[str, Any]

    def run_dir(self, aggregator: str) -> Path:
        return Path(self.report["methods"][aggregator]["run_dir"])


def run_hetero_comparison(out: Path, only: list[str] | None = None) -> Comparison:
    """``fedtune compare`` (every aggregator, both baselines) on the in-process Grid; with
    ``only``, those aggregators and no baselines (a partial test session)."""
    from fedtune.aggregation import available
    from fedtune.runs.compare import BASELINES, COMPARISON_JSON, run_comparison
    from tests.support.engine import engine_in_process

    scenario = hetero()
    aggregators = available() if only is None else only
    with engine_in_process():
        folder = run_comparison(scenario, aggregators, out, command=COMMAND,
                                baselines=BASELINES if only is None else ())
    return Comparison(scenario, aggregators, folder,
                      json.loads((folder / COMPARISON_JSON).read_text()))
