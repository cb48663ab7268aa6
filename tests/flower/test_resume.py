"""Checkpoint and resume through the round loop and the real ClientApp (in-process Grid):
a run that dies after round 1 and is resumed ends with exactly the adapter of an
uninterrupted run."""

import json

import pytest
import torch

from fedtune.config import load_scenario
from fedtune.core.codec import scale_folded_state_dict
from fedtune.flower.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    adapter_from_state,
    load_checkpoint,
)
from fedtune.flower.inprocess_grid import simulate_in_process
from fedtune.model.lora import exported_update
from fedtune.runs import SimulationError

# clients_per_round < num_clients: the sampler's state must survive the restart too
SETS = ["run.rounds=3", "federation.clients_per_round=3", "federation.min_clients=2"]


class _Crash(RuntimeError):
    pass


def _crash_after(round_number):
    def progress(record):
        if record["round"] == round_number:
            raise _Crash(f"killed after round {round_number}")
    return progress


def _adapter(run_dir):  # the exported update, each module's scale folded into B
    return exported_update(run_dir / "adapter")


@pytest.mark.parametrize("aggregator", ["fedavg"])
def test_resumed_run_ends_with_the_uninterrupted_adapter(tmp_path, aggregator):
    scenario = load_scenario("tiny", [*SETS, f"federation.aggregator='{aggregator}'"])
    after_round_1 = {}

    def snapshot(record):  # RUN_DIR/adapter is the latest global adapter during the run
        if record["round"] == 1:
            (run_dir,) = (tmp_path / "whole").iterdir()
            after_round_1.update(adapter=_adapter(run_dir), checkpoint=load_checkpoint(run_dir))

    whole = simulate_in_process(scenario, out_dir=tmp_path / "whole", progress=snapshot)
    global_1 = adapter_from_state(after_round_1["checkpoint"]["strategy"]["global"])
    expected = scale_folded_state_dict(global_1.factors)
    assert after_round_1["adapter"].keys() == expected.keys()
    assert all(torch.equal(after_round_1["adapter"][k], v) for k, v in expected.items())
    assert any(not torch.equal(after_round_1["adapter"][k], v)
               for k, v in _adapter(whole).items())  # rewritten after later rounds
    with pytest.raises(SimulationError):
        simulate_in_process(scenario, out_dir=tmp_path / "cut", progress=_crash_after(1))
    (cut,) = (tmp_path / "cut").iterdir()
    assert load_checkpoint(cut)["round"] == 1
    failed = json.loads((cut / "summary.json").read_text())
    assert failed["status"] == "failed"
    assert failed["error"] == "_Crash: killed after round 1"
    assert "(_Crash: killed after round 1)" in (cut / "report.html").read_text()
    resumed = simulate_in_process(scenario, resume=cut)
    assert resumed == cut
    a, b = _adapter(whole), _adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["status"] == "completed" and "error" not in summary
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    reference = json.loads((whole / "summary.json").read_text())
    assert [r["train_loss"] for r in summary["rounds"]] == [
        r["train_loss"] for r in reference["rounds"]]
    assert load_checkpoint(resumed)["round"] == 3


def test_resume_refuses_a_directory_without_checkpoint_or_with_another_scenario(tmp_path):
    from fedtune.flower.checkpoint import save_checkpoint
    from fedtune.flower.server_app import restore
    from fedtune.flower.strategy import FedtuneStrategy

    scenario = load_scenario("tiny", ["run.rounds=2"])
    with pytest.raises(CheckpointError, match=f"no {CHECKPOINT_FILE}"):
        load_checkpoint(tmp_path)
    other = load_scenario("tiny", ["run.rounds=2", "train.lr=0.1"])
    strategy = FedtuneStrategy(other)
    save_checkpoint(tmp_path, {"round": 1, "scenario": other.to_json(),
                               "strategy": strategy.state_dict(), "recorder": "{}"})
    assert restore(FedtuneStrategy(other), other, tmp_path) == 2
    with pytest.raises(CheckpointError, match="another scenario"):
        restore(FedtuneStrategy(scenario), scenario, tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path)


def test_checkpoint_state_round_trips_the_accountant_and_the_sampler(tmp_path):
    """A reproducible experiment's seeded sampler goes on where it stopped; a private
    run's sampler is the OS's and leaves no state (nothing to replay the sample from)."""
    from fedtune.flower.checkpoint import save_checkpoint
    from fedtune.flower.strategy import FedtuneStrategy

    dp = ["run.rounds=3", "federation.clients_per_round=2", "privacy.mode='central'",
          "privacy.noise_multiplier=1.0", "privacy.min_clients=2", "privacy.max_epsilon=0"]
    assert FedtuneStrategy(load_scenario("tiny", dp)).state_dict()["rng"] is None
    scenario = load_scenario("tiny", [*dp, "privacy.reproducible=true"])
    strategy = FedtuneStrategy(scenario)
    strategy.accountant.step(1.0, 0.5)
    strategy.accountant.step(1.0, 0.5)
    strategy.rng.random()
    restored = FedtuneStrategy(scenario)
    save_checkpoint(tmp_path, {"strategy": strategy.state_dict()})  # through the file
    restored.load_state_dict(load_checkpoint(tmp_path)["strategy"])
    assert restored.accountant.history == strategy.accountant.history
    assert restored.accountant.epsilon() == strategy.accountant.epsilon() > 0
    assert [restored.rng.random() for _ in range(5)] == [strategy.rng.random() for _ in range(5)]
