"""DP federations through the round loop and the real ClientApp (in-process Grid) on the
tiny scenario: epsilon is reported every round and equals Opacus' accountant, the
budget stops the run, and distributed noise, compression and DP-SGD work together.
Under client-level DP the cohort is Poisson (its size varies) and the server publishes
no per-client record and no norm statistic (tests/flower/test_dp_sampling.py)."""

import json

import pytest
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from fedtune.config import load_scenario
from fedtune.flower.inprocess_grid import simulate_in_process
from fedtune.privacy.accountant import epsilon_after

Z, DELTA = 1.2, 1e-4


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def central_run(tmp_path_factory):
    """fedavg, central noise, 2 of 4 clients a round, 3 rounds planned but a budget that
    holds only 2 of them (on_budget = stop)."""
    two_rounds = epsilon_after([(Z, 0.5, 2)], DELTA)
    scenario = load_scenario("tiny", [
        "run.rounds=3", "federation.clients_per_round=2", 'privacy.mode="central"',
        f"privacy.noise_multiplier={Z}", f"privacy.delta={DELTA}", "privacy.clip_norm=0.3",
        f"privacy.max_epsilon={two_rounds * 1.0001}", 'privacy.on_budget="stop"'])
    return scenario, simulate_in_process(scenario, out_dir=tmp_path_factory.mktemp("runs"))


def test_epsilon_each_round_equals_the_library_accountant(central_run):
    _, run_dir = central_run
    summary = _summary(run_dir)
    assert summary["status"] == "completed"
    library = RDPAccountant()
    for record in summary["rounds"]:
        library.step(noise_multiplier=Z, sample_rate=0.5)
        assert record["epsilon"] == pytest.approx(library.get_epsilon(delta=DELTA), rel=1e-9)
        assert record["dp_noise_std"] == pytest.approx(Z * 0.3 / 2)  # over the expected 2
        assert record["dp_noise_to_signal"] > 0
        assert record["clients_replied"] == record["clients_sampled"] <= 4  # Poisson
        assert "dp_update_norm_max" not in record  # un-noised: only in an experiment


def test_budget_stops_the_run_before_it_is_exceeded(central_run):
    _, run_dir = central_run
    summary = _summary(run_dir)
    privacy = summary["privacy"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert privacy["rounds_released"] == 2
    assert "round 3 would take epsilon past" in privacy["stopped"]
    assert privacy["epsilon"] <= privacy["budget"]
    assert privacy["planned_epsilon"] > privacy["budget"]  # 3 rounds would not have fit
    assert load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_distributed_noise_with_compression_and_dpsgd(tmp_path):
    """ffa with each client clipping and noising its own B update, sending it top-50 % in
    int8, and training with DP-SGD: the client-level epsilon reported (q = 1: every
    client joins every round), and no per-client record or byte count written (under
    client-level DP it would say who took part)."""
    scenario = load_scenario("tiny", [
        "run.rounds=2", 'federation.aggregator="ffa"', 'privacy.mode="distributed"',
        "privacy.target_epsilon=8", f"privacy.delta={DELTA}", "privacy.clip_norm=0.5",
        "privacy.sample_noise_multiplier=1.5", "privacy.sample_clip_norm=1.0",
        "compression.upload_density=0.5", "compression.upload_values='int8'"])
    summary = _summary(simulate_in_process(scenario, out_dir=tmp_path))
    assert summary["status"] == "completed"
    plan = scenario.privacy_plan()
    assert [r["epsilon"] for r in summary["rounds"]] == pytest.approx(
        [epsilon_after([(plan.noise_multiplier, 1.0, n)], DELTA) for n in (1, 2)])
    assert summary["privacy"]["epsilon"] <= 8.0
    lines = [json.loads(x) for x in (tmp_path.glob("*/metrics.jsonl").__next__())
             .read_text().splitlines()]
    assert not [x for x in lines if x["phase"] == "train"]
    for r in summary["rounds"]:  # bytes withheld: under DP a total says who took part
        assert r["clients_replied"] == scenario.data.num_clients
        assert not {"bytes_up", "bytes_up_dense", "seconds"} & set(r)
    assert summary["totals"]["bytes_up"] is None


HETERO_TINY = ['model.source="tiny"', 'model.device="cpu"', "run.rounds=2", "train.steps=3",
               "train.lr=5e-3", "data.seq_len=32", "data.max_samples_per_client=48",
               "data.max_eval_sequences=4", "federation.clients_per_round=6",
               "report.generations=0"]


@pytest.mark.parametrize("aggregator", ["zeropad", "flora", "flexlora"])
def test_central_dp_with_mixed_ranks(aggregator, tmp_path):
    """Device profiles with different ranks: zeropad's factor form and flora / flexlora's
    dense form run through the Flower round loop, release a global adapter of the
    expected rank, and report the noise the mechanism promises."""
    scenario = load_scenario("hetero", [
        *HETERO_TINY, f'federation.aggregator="{aggregator}"',
        *(["federation.rank_budget=8"] if aggregator == "flora" else []),  # flora's key
        'privacy.mode="central"', "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.2",
        "privacy.delta=1e-3"])
    summary = _summary(simulate_in_process(scenario, out_dir=tmp_path))
    assert summary["status"] == "completed"
    for record in summary["rounds"]:
        assert record["dp_noise_std"] == pytest.approx(0.5 * 0.2 / 6)  # expected cohort 6
    assert summary["privacy"]["sample_rate"] == 6 / scenario.data.num_clients
    tensors = load_file(next(tmp_path.glob("*/adapter/adapter_model.safetensors")))
    ranks = {t.shape[0] for k, t in tensors.items() if "lora_A" in k}
    if aggregator == "flora":
        assert ranks == {8}  # the rank budget
    else:
        assert len(ranks) == 1 and ranks.pop() >= 4
