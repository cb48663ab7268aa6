"""`fedtune client` / `fedtune server` given bad input exit non-zero with a message that
names the problem, before anything connects or listens. The command runs in-process
(typer's runner: the checks are the same code, without a Python start-up each)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from tests.deploy import harness as h


def _run(*args: str, cwd=None) -> Done:
    from typer.testing import CliRunner

    from fedtune.cli import app

    here = os.getcwd()
    os.chdir(cwd or h.REPO)
    try:
        result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    finally:
        os.chdir(here)
    return Done(result.exit_code, result.stderr + result.stdout)


@dataclass
class Done:
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return h.client_files(tmp_path_factory.mktemp("data"), 1)[0]


@pytest.mark.parametrize(("setup", "message"), [
    (lambda tmp, data: ["--data", str(tmp / "nope.txt"), "--insecure"], "does not exist"),
    (lambda tmp, data: ["--data", str(_empty(tmp)), "--insecure"], "is empty"),
    (lambda tmp, data: ["--data", str(data), "--profile", "no-such-device", "--insecure"],
     "unknown device profile 'no-such-device'"),
    (lambda tmp, data: ["--data", str(data)], "--root-certificates CA_FILE"),
    (lambda tmp, data: ["--data", str(data), "--root-certificates", str(tmp / "ca.crt")],
     "no such file"),
])
def test_client_refuses_bad_input_before_connecting(tmp_path, data_file, setup, message):
    port = h.free_port()  # nothing listens there: the checks must come first
    done = _run("client", "--server", f"127.0.0.1:{port}", "--connect-wait", "0",
                *setup(tmp_path, data_file))
    assert done.returncode == 1, done.stderr
    assert message in done.stderr


def test_client_says_when_the_server_is_unreachable(data_file):
    port = h.free_port()
    done = _run("client", "--server", f"127.0.0.1:{port}", "--data", str(data_file),
                "--insecure", "--connect-wait", "2")
    assert done.returncode == 1
    assert f"cannot reach the server at 127.0.0.1:{port} (tried for 2 s)" in done.stderr


def test_server_without_certificates_asks_for_them_or_insecure(tmp_path):
    done = _run("server", "-c", str(h.REPO / "server" / "server.toml"), "--out",
                str(tmp_path), "--set", "server.ca_cert=''", "--set", "server.cert=''",
                "--set", "server.key=''")
    assert done.returncode == 2
    assert "needs TLS certificates" in done.stderr and "--insecure" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing was created


def test_server_refuses_missing_certificate_files(tmp_path):
    done = _run("server", "-c", str(h.REPO / "server" / "server.toml"), "--out",
                str(tmp_path), cwd=tmp_path)  # certs/... do not exist here
    assert done.returncode == 2
    assert "server.ca_cert = 'certs/ca.crt': no such file" in done.stderr


def test_resume_of_a_folder_that_is_no_run(tmp_path):
    done = _run("server", "--resume", str(tmp_path))
    assert done.returncode == 2
    assert "is not a fedtune run directory" in done.stderr


def test_keys_without_a_running_server_say_so(tmp_path):
    done = _run("keys", "list", "--run", str(tmp_path))
    assert done.returncode == 1
    assert "no running fedtune server" in done.stderr


def _empty(folder):
    path = folder / "empty.txt"
    path.write_text("\n\n")
    return path


def _stopped_run(folder, rounds_done=2, extra=()):
    """A run directory as a stopped server leaves it: its scenario and a checkpoint
    after ``rounds_done`` rounds (enough for --resume's checks)."""
    import json

    from fedtune.config import load_scenario

    scenario = load_scenario(str(h.REPO / "server" / "server.toml"),
                             [*h.TINY, "run.rounds=3", "server.insecure=true",
                              'server.ca_cert=""', 'server.cert=""', 'server.key=""',
                              'server.auth_keys=""', *extra])
    from fedtune.flower.checkpoint import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scenario.json").write_text(json.dumps(scenario.to_dict()))
    save_checkpoint(folder, {"round": rounds_done, "scenario": scenario.to_json()})
    return folder


@pytest.mark.parametrize(("sets", "message"), [
    (["data.seq_len=64"], "--resume cannot change data.seq_len"),
    (["run.rounds=5", "lora.rank=8", "train.steps=9"],
     "--resume cannot change lora.rank, train.steps"),
    (["run.rounds=1"], "--set run.rounds=1: 2 rounds of"),
])
def test_resume_refuses_an_override_it_cannot_apply_by_name(tmp_path, sets, message):
    run = _stopped_run(tmp_path / "run")
    done = _run("server", "--resume", str(run), *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_resume_applies_more_rounds_and_an_unchanged_key():
    import tempfile
    from pathlib import Path

    from fedtune.deploy.server import resumed_scenario

    with tempfile.TemporaryDirectory() as tmp:
        run = _stopped_run(Path(tmp) / "run")
        assert resumed_scenario(run, []).run.rounds == 3
        chosen = resumed_scenario(run, ["run.rounds=5", "data.seq_len=32"])  # 32: as saved
        assert chosen.run.rounds == 5
        assert chosen.data.seq_len == 32


def test_more_rounds_is_refused_under_client_level_dp(tmp_path):
    from fedtune.config import ConfigError
    from fedtune.deploy.server import resumed_scenario

    run = _stopped_run(tmp_path / "run", extra=['privacy.mode="central"',
                                                "privacy.noise_multiplier=1.0",
                                                "privacy.clip_norm=0.5"])
    with pytest.raises(ConfigError, match="planned for 3 rounds"):
        resumed_scenario(run, ["run.rounds=4"])


@pytest.mark.parametrize("signum", [2, 15])  # SIGINT (Ctrl-C), SIGTERM (kill PID)
def test_a_stop_signal_ends_the_serve_block_once_and_a_second_is_only_noted(signum):
    import os
    import signal
    import time

    from fedtune.deploy import server

    cleaned = []
    with pytest.raises(server.Interrupted) as stopped:
        with server.stop_signals() as received:
            try:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler raises here
                cleaned.append("not reached")
            finally:
                os.kill(os.getpid(), signum)  # a second one during the clean-up
                cleaned.append(True)
    assert stopped.value.signum == signum and received == [signum] and cleaned == [True]
    assert signal.getsignal(signum) is not None  # the previous handler is back


def test_a_checkpoint_continues_under_more_rounds_and_nothing_else():
    from fedtune.config import load_scenario
    from fedtune.flower.checkpoint import same_run

    saved = load_scenario("tiny", ["run.rounds=2"]).to_json()
    assert same_run(saved, load_scenario("tiny", ["run.rounds=5"]).to_json())
    assert not same_run(saved, load_scenario("tiny", ["run.rounds=5", "lora.rank=2"]).to_json())
