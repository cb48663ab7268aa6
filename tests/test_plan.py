"""`fedtune plan` against what a run does, `fedtune list`, the light command line, and
the bundled files found through ``fedtune.resources``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import fedtune
import fedtune.resources as resources
from fedtune.aggregation import available
from fedtune.config import ConfigError, load_scenario
from fedtune.model.memory import estimate, model_dims
from fedtune.planning.client_settings import client_settings
from fedtune.planning.profiles import ProfileError, load_profile
from fedtune.planning.run_plan import PACKED_KEY, PEFT_PREFIX, plan_run, training_device
from tests.support.cli import run_cli
from tests.support.hetero import TINY as TINY_HETERO

REPO = Path(__file__).resolve().parents[1]
QUICK = ["run.rounds=2", "train.steps=2"]


def _recorded(run_dir: Path) -> tuple[list[dict], dict[str, dict]]:
    """The run's round records and, per client (a simulated client is named by its
    partition), its train record of round 2."""
    summary = json.loads((run_dir / "summary.json").read_text())
    per_client = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("phase") == "train" and record.get("round") == 2:
            per_client[record["client"]] = record
    return summary["rounds"], per_client


@pytest.mark.parametrize("scenario, overrides", [
    ("tiny", []),
    ("tiny", ["compression.upload_density=0.1", 'compression.upload_values="int8"',
              'compression.download_values="fp16"']),
    ("hetero", [*TINY_HETERO, 'federation.aggregator="zeropad"']),  # a rank per profile
], ids=["dense", "compressed", "mixed-ranks"])
def test_plan_bytes_are_what_a_run_records(tmp_path, scenario, overrides):
    """Per client and per round, each way: the plan's sizes equal the bytes the server
    counted on the messages of a real (in-process) run."""
    from fedtune.flower.inprocess_grid import simulate_in_process

    chosen = load_scenario(scenario, [*overrides, *QUICK])
    made = plan_run(chosen)
    rounds, per_client = _recorded(simulate_in_process(chosen, tmp_path))
    assert rounds[0]["bytes_down"] == 0  # round 1 sends no adapter
    assert rounds[0]["bytes_up"] == rounds[1]["bytes_up"] == made.round_bytes("up")
    assert rounds[1]["bytes_down"] == made.round_bytes("down")
    assert {str(c.partition): (c.bytes_down, c.bytes_up) for c in made.clients} == \
        {name: (r["bytes_down"], r["bytes_up"]) for name, r in per_client.items()}
    if len({c.rank for c in made.clients}) > 1:
        assert len({c.bytes_up for c in made.clients}) > 1


def test_plan_memory_is_the_estimators_and_the_budget_the_profiles():
    chosen = load_scenario("hetero", [*TINY_HETERO, 'federation.aggregator="zeropad"'])
    made = plan_run(chosen)
    dims = model_dims("tiny")
    for planned, settings in zip(made.clients, client_settings(chosen), strict=True):
        profile = tomllib.loads(resources.path("profile", settings.profile).read_text())
        assert planned.budget_mb == profile["memory_budget_mb"]
        assert planned.memory_device == profile["device"]
        assert (planned.rank, planned.quantization, planned.batch_size, planned.seq_len) == \
            (settings.rank, settings.quantization, settings.batch_size, settings.seq_len)
        expected = estimate(dims, settings.quantization, settings.rank,
                            chosen.lora.target_modules, settings.batch_size, settings.seq_len,
                            device=profile["device"])
        assert planned.memory_mb == expected.total_mb
        assert planned.fits == (expected.total_mb <= profile["memory_budget_mb"])
    assert len({c.profile for c in made.clients}) == 4


def test_plan_holds_each_clients_texts():
    from fedtune.data import clients_of

    chosen = load_scenario("tiny")
    held = {c.client_id: (len(c.train), len(c.eval))
            for c in clients_of(chosen.data, chosen.run.seed)}
    assert {c.client: (c.train_texts, c.eval_texts) for c in plan_run(chosen).clients} == held


def test_planned_epsilon_is_what_the_run_spends(tmp_path):
    """Client-level DP: the plan's epsilon after all rounds is the one the run reports
    after its last round (every round released)."""
    from fedtune.flower.inprocess_grid import simulate_in_process

    chosen = load_scenario("privacy", ['model.source="tiny"', "model.quantization='none'",
                                       "data.seq_len=32", "data.max_samples_per_client=48",
                                       "data.max_eval_sequences=4", "train.steps=1",
                                       "privacy.reproducible=true", "run.rounds=2"])
    made = plan_run(chosen)
    assert made.privacy is not None and made.privacy["rounds"] == 2
    rounds, _ = _recorded(simulate_in_process(chosen, tmp_path))
    assert len(rounds) == 2
    assert rounds[-1]["epsilon"] == pytest.approx(made.privacy["planned_epsilon"], rel=1e-9)
    assert made.privacy["planned_epsilon"] == pytest.approx(chosen.privacy_plan().planned_epsilon)
    assert plan_run(load_scenario("tiny")).privacy is None


def test_the_training_device_follows_the_engines_gpu_share():
    import torch

    assert training_device(load_scenario("tiny"))[0] == "cpu"
    auto = load_scenario("tiny", ['model.device="auto"'])
    device, reason = training_device(auto)
    if torch.cuda.is_available():  # a share sized from the memory estimate
        assert device == "cuda" and "MiB estimated per client" in reason
    else:
        assert device == "cpu" and reason == "model.device = 'auto' and no CUDA GPU here"
    shared = load_scenario("tiny", ['model.device="auto"', "simulation.gpus_per_client=0.5"])
    assert training_device(shared)[0] == ("cuda" if torch.cuda.is_available()
                                          else "unavailable")


def test_the_plans_wire_constants_are_the_flower_layers():
    from fedtune.flower import messages, replies

    assert PACKED_KEY == messages.PACKED and PEFT_PREFIX == replies.PEFT_PREFIX


# --------------------------------------------------------------------------- the CLI


def test_plan_command_prints_every_client_and_the_rounds_traffic(tmp_path):
    done = run_cli("plan", "-s", "tiny", cwd=tmp_path)
    assert done.exit_code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.startswith("  ") for line in lines) == 4  # one per client
    assert "trains on: cpu" in done.stdout and "client-level DP: off" in done.stdout
    assert "per round from round 2 (round 1 sends no adapter): down 33.9 KB, up 33.9 KB" \
        in done.stdout
    bad = run_cli("plan", "-s", "tiny", "--set", "train.stepz=1", cwd=tmp_path)
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_plan_of_many_clients_prints_a_line_per_kind(tmp_path):
    done = run_cli("plan", "-s", "tiny", "--set", "data.num_clients=30", cwd=tmp_path)
    assert done.exit_code == 0, done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("  ")]
    assert line.startswith("  30 clients ") and "r=4" in line


def test_list_names_every_bundled_scenario_profile_and_aggregator(tmp_path):
    done = run_cli("list", cwd=tmp_path)
    assert done.exit_code == 0, done.stderr
    names = [*resources.names("scenario"), *resources.names("profile"), *available()]
    assert len(names) >= 7 + 5 + 8
    for name in names:
        (line,) = [ln for ln in done.stdout.splitlines() if ln.split()[:1] == [name]]
        assert len(line.split()) > 1, f"{name} has no description"


def test_help_version_and_h_load_no_torch():
    """The CLI edge is light: --help, -h and --version import neither torch nor Flower."""
    code = ("import sys\nfrom fedtune.cli import main\nsys.argv = ['fedtune', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'flwr') if m in sys.modules))")
    outputs = {}
    for flag in ("--help", "-h", "--version"):
        done = subprocess.run([sys.executable, "-c", code, flag], capture_output=True,
                              text=True, cwd=REPO, timeout=120)
        assert "HEAVY []" in done.stdout, (flag, done.stdout[-500:], done.stderr[-2000:])
        outputs[flag] = done.stdout
    assert outputs["-h"] == outputs["--help"] and "plan" in outputs["--help"]
    assert outputs["--version"].startswith(f"fedtune {fedtune.__version__}")


# --------------------------------------------------------------------------- resources


def test_the_bundled_folders_are_the_repositorys_own():
    """In a checkout the package's bundled folders are the top-level ones (one source)."""
    assert resources.folder("scenario").resolve() == REPO / "simulations"
    assert resources.folder("profile").resolve() == REPO / "clients" / "profiles"
    assert resources.folder("server").resolve() == REPO / "server"
    assert resources.names("scenario") == sorted(p.stem for p in
                                                 (REPO / "simulations").glob("*.toml"))


def test_repository_paths_name_the_bundled_files_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_scenario("server/server.toml").run.name == "deployment"
    assert load_scenario("simulations/tiny.toml").run.name == "tiny"
    assert load_profile("clients/profiles/cpu-box-16gb.toml").name == "cpu-box-16gb"
    (tmp_path / "server").mkdir()  # a file of the user's own wins
    (tmp_path / "server" / "server.toml").write_text('[run]\nname = "mine"\n')
    assert load_scenario("server/server.toml").run.name == "mine"
    with pytest.raises(ConfigError, match="not found"):
        load_scenario("server/nope.toml")


@pytest.fixture
def nothing_bundled(tmp_path, monkeypatch):
    """An installation that lost its bundled files."""
    empty = tmp_path / "bundled"
    empty.mkdir()
    monkeypatch.setattr(resources, "folder", lambda kind: empty / kind)


def test_a_missing_bundled_file_is_a_documented_error(nothing_bundled):
    with pytest.raises(ConfigError, match="bundled scenario 'default' is not in this"):
        load_scenario(None)
    with pytest.raises(ConfigError, match="bundled scenarios: \\(none: reinstall fedtune\\)"):
        load_scenario("tiny")
    with pytest.raises(ProfileError, match="bundled profiles: \\(none\\)"):
        load_profile("cpu-box-16gb")
    texts = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind."]
    with pytest.raises(fedtune.ConfigError, match="bundled scenario 'default'"):
        fedtune.Client(texts, model="tiny").train_local(steps=1)
