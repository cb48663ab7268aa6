"""Client-level DP as DP-FedAvg runs it, through the real strategy and ClientApp on the
in-process Grid: a Poisson sample drawn from OS entropy (not the run seed) that no file
of the run directory and no log line gives away, the accountant charged with the
sampling rate actually used when clients are missing, and a reproducible experiment
mode that repeats its sample and says so."""

import contextlib
import json
import logging

import pytest
from flwr.app import ArrayRecord, ConfigRecord, MessageType

from fedtune.config import load_scenario
from fedtune.flower.checkpoint import load_checkpoint
from fedtune.flower.client_app import make_client_app
from fedtune.flower.inprocess_grid import InProcessGrid
from fedtune.flower.server_app import run_federation
from fedtune.flower.strategy import FedtuneStrategy
from fedtune.privacy.accountant import epsilon_after
from fedtune.runs.rundir import new_run_dir

Z, DELTA = 1.0, 1e-3
DP = ["run.rounds=2", "train.steps=1", "data.max_samples_per_client=16",
      "report.generations=0", "federation.clients_per_round=2", 'privacy.mode="central"',
      f"privacy.noise_multiplier={Z}", f"privacy.delta={DELTA}", "privacy.clip_norm=0.3"]
#: keys that would say who took part
WHO = {"sampled_partitions", "dropped_out", "late", "client", "node_id", "partition"}


def _samples(scenario, rounds=8):
    """The partitions that each of ``rounds`` train configurations sends work to (the
    strategy's own sampling; nothing is trained)."""
    with InProcessGrid(make_client_app(scenario), scenario.data.num_clients) as grid:
        strategy = FedtuneStrategy(scenario)
        return [sorted(grid.partition_of(m.metadata.dst_node_id) for m in
                       strategy.configure_train(r, ArrayRecord(), ConfigRecord(), grid))
                for r in range(1, rounds + 1)]


def test_under_dp_the_sample_is_poisson_from_os_entropy_and_reproducible_only_on_request():
    private = load_scenario("tiny", DP)
    first, second = _samples(private), _samples(private)
    assert first != second  # the same run.seed, another sample (equal: p = 2**-32)
    assert len({len(s) for s in first + second}) > 1  # Poisson: the cohort's size varies
    experiment = load_scenario("tiny", [*DP, "privacy.reproducible=true"])
    assert _samples(experiment) == _samples(experiment)
    plain = load_scenario("tiny", DP[:5])  # no DP: the seeded fixed-size sample, as before
    seeded = _samples(plain)
    assert seeded == _samples(plain) and {len(s) for s in seeded} == {2}


def _run(scenario, tmp_path, lose_after_round_1=0):
    """A federation on an in-process Grid kept for the test (its delivered messages);
    ``lose_after_round_1`` nodes disconnect once round 1 ends."""
    run_dir = new_run_dir(tmp_path, scenario.run.name)
    with InProcessGrid(make_client_app(scenario), scenario.data.num_clients) as grid:
        def progress(record):
            if record["round"] == 1:
                for node in sorted(grid.get_node_ids())[:lose_after_round_1]:
                    grid.lose_node(node)
        run_federation(grid, scenario, run_dir, progress)
    return run_dir, grid


@contextlib.contextmanager
def _fedtune_log():
    """Every message of the "fedtune" logger, down to DEBUG, while the block runs."""
    logger = logging.getLogger("fedtune")
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    with _fedtune_log() as lines:
        run_dir, grid = _run(load_scenario("tiny", DP), tmp_path_factory.mktemp("runs"))
    return run_dir, grid, "\n".join(lines)


def _keys(value):
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_the_sample_appears_in_no_file_of_the_run_directory_and_no_log(private_run):
    run_dir, grid, log = private_run
    trained = {m.dst_node_id for m in grid.delivered if m.message_type == MessageType.TRAIN}
    assert trained  # the run did train (two rounds; p(nobody in either) = 1/256)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"summary.json", "metrics.jsonl", "checkpoint.pt"}
    for node in trained:  # node ids are 63-bit random numbers: no false hits
        for path in files:
            assert str(node).encode() not in path.read_bytes(), (node, path.name)
        assert str(node) not in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not WHO & _keys(summary["rounds"])
    assert [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x).get("phase") == "train"] == []  # no per-client records
    assert load_checkpoint(run_dir)["strategy"]["rng"] is None  # OS entropy: no state
    assert {r["clients_sampled"] for r in summary["rounds"]} <= set(range(5))  # counts


def test_the_summary_states_the_mechanism_and_evaluation_is_off(private_run):
    run_dir, grid, _ = private_run
    privacy = json.loads((run_dir / "summary.json").read_text())["privacy"]
    assert "Poisson" in privacy["mechanism"] and "expected cohort" in privacy["mechanism"]
    assert privacy["neighbouring"].startswith("add/remove one client")
    assert privacy["randomness"] == "OS entropy" and privacy["reproducible"] is False
    assert privacy["federated_evaluation"] == "off"
    assert not [m for m in grid.delivered if m.message_type == MessageType.EVALUATE]
    assert privacy["epsilon"] == pytest.approx(epsilon_after([(Z, 0.5, 2)], DELTA))


def test_epsilon_follows_the_sampling_rate_used_when_clients_are_missing(tmp_path):
    """Two of four clients leave after round 1: round 2 samples the two left with
    q = 2 / 2 = 1 (expected cohort kept at 2), and is charged at q = 1. A reproducible
    experiment, which the summary and the log say."""
    scenario = load_scenario("tiny", [*DP, "privacy.reproducible=true"])
    with _fedtune_log() as lines:
        run_dir, _ = _run(scenario, tmp_path, lose_after_round_1=2)
    assert any("privacy.reproducible = true" in line for line in lines)
    assert any("sampling rate 1 instead of 0.5" in line for line in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    first, second = summary["rounds"]
    assert first["epsilon"] == pytest.approx(epsilon_after([(Z, 0.5, 1)], DELTA))
    used = epsilon_after([(Z, 0.5, 1), (Z, 1.0, 1)], DELTA)
    assert second["epsilon"] == pytest.approx(used)
    assert used > epsilon_after([(Z, 0.5, 2)], DELTA) * 1.2  # the planned q would under-report
    assert second["clients_sampled"] == 2  # q = 1: both left
    privacy = summary["privacy"]
    assert privacy["sample_rate"] == 0.5 and privacy["sample_rate_max_used"] == 1.0
    assert privacy["reproducible"] is True and "run seed" in privacy["randomness"]
