"""The simulator at scale: 1,000 virtual clients, 5 sampled per round, seeded dropouts and
stragglers from two device profiles of different speed, and the run's HTML report.

One simulation serves every test here (module fixture)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedtune.config import load_scenario
from fedtune.runs.simulate import simulate
from fedtune.train.batches import client_batch

pytestmark = pytest.mark.e2e

PROFILE = """name = "{name}"
memory_budget_mb = 4000
device = "cpu"
quantization = "none"
rank = 4
alpha_ratio = 2.0
batch_size = 4
seq_len = 32
speed_factor = {speed}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("scale")
    for name, speed in (("fast", 1.0), ("slow", 0.25)):
        (tmp / f"{name}.toml").write_text(PROFILE.format(name=name, speed=speed))
    scenario_file = tmp / "scale.toml"
    scenario_file.write_text(
        (Path(__file__).resolve().parents[2] / "simulations" / "tiny.toml").read_text()
        + f"""
[clients]
mix = {{ "{tmp / 'fast.toml'}" = 0.5, "{tmp / 'slow.toml'}" = 0.5 }}
""")
    scenario = load_scenario(scenario_file, [
        "data.num_clients=1000", "data.partition='iid'", "federation.clients_per_round=5",
        "federation.eval_clients=4", "federation.min_clients=1", "run.rounds=2",
        "train.steps=4", "simulation.dropout=0.3", "simulation.round_deadline=2.0"])
    lines: list[str] = []
    run_dir = simulate(scenario, out_dir=tmp / "runs", progress=lambda r: lines.append(r))
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(scenario=scenario, run_dir=run_dir, summary=summary,
                           records=records, progress=lines)


def test_a_thousand_clients_run_two_rounds_with_five_sampled(run: SimpleNamespace) -> None:
    assert run.summary["status"] == "completed"
    rounds = run.summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["clients_sampled"] == 5 and len(set(r["sampled_partitions"])) == 5
        assert all(0 <= p < 1000 for p in r["sampled_partitions"])
        assert r["clients_replied"] + r["dropouts"] + r["stragglers"] == 5
        assert math.isfinite(r["eval_loss"])
    assert [r["round"] for r in run.progress] == [0, 1, 2]  # progress during the run
    evaluated = {rec["partition_id"] for rec in run.records if rec["phase"] == "eval"}
    assert len(evaluated) == 4  # the fixed evaluation subset, not all 1,000


def test_each_sampled_client_trained_on_its_own_partition_only(run: SimpleNamespace) -> None:
    for r in run.summary["rounds"]:
        trained = [rec for rec in run.records
                   if rec["phase"] == "train" and rec["round"] == r["round"]]
        partitions = sorted(int(rec["partition_id"]) for rec in trained)
        lost = set(r["dropped_out"]) | set(r["late"])
        assert partitions == sorted(set(r["sampled_partitions"]) - lost)
        for rec in trained:
            own = client_batch(run.scenario, int(rec["partition_id"])).train
            assert rec["num_examples"] == len(own)
            assert rec["client"] == str(rec["partition_id"])


def _expected_faults(scenario, partitions: list[int], server_round: int
                     ) -> tuple[list[int], list[int]]:
    """The seeded draw, recomputed here from its definition: per client in partition
    order, u < dropout drops it; else tokens / (1000 x speed) x lognormal(0, 0.25) past
    the 2 s deadline makes it a straggler. Speed: the client's profile's."""
    from fedtune.planning.client_settings import client_settings

    settings = client_settings(scenario)
    rng = random.Random(f"{scenario.run.seed}:{server_round}:faults")
    dropped, late = [], []
    for p in sorted(partitions):
        u, jitter = rng.random(), rng.lognormvariate(0.0, 0.25)
        if u < 0.3:
            dropped.append(p)
            continue
        s = settings[p]
        seconds = 4 * s.batch_size * s.seq_len / (1000.0 * s.speed_factor) * jitter
        if seconds > 2.0:
            late.append(p)
    return dropped, late


def test_dropouts_and_stragglers_match_the_seeded_draw(run: SimpleNamespace) -> None:
    total_dropped = total_late = 0
    for r in run.summary["rounds"]:
        dropped, late = _expected_faults(run.scenario, r["sampled_partitions"], r["round"])
        assert (r["dropped_out"], r["late"]) == (dropped, late)
        assert (r["dropouts"], r["stragglers"]) == (len(dropped), len(late))
        total_dropped, total_late = total_dropped + len(dropped), total_late + len(late)
    assert total_dropped + total_late > 0  # the draw did take clients out


def test_the_report_is_written_with_its_plots(run: SimpleNamespace) -> None:
    page = (run.run_dir / "report.html").read_text()
    assert page.count("<img") == 3  # perplexity, bytes, participation (no DP here)
    for title in ("Held-out perplexity per round", "Bytes per round", "Participation per round",
                  "dropped out", "stragglers", "num_clients = 1000", 'partition = "iid"'):
        assert title in page
