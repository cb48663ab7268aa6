"""A deployed server's lifecycle, with real processes on localhost (tiny model, TLS and
node authentication, three clients; the third is hostile: a 512 KiB extra record in
every update, a held-out loss of 0.01 over 10**15 tokens in every evaluation).

Three starts of one run. The first is stopped by SIGTERM (to its own pid, as ``kill
PID`` does) while the clients train round 2; the second (``--resume --set
run.rounds=3``) by SIGINT to its process group (a terminal's Ctrl-C) while they train
round 2 again; the third (``--resume``) completes. Each stop leaves none of the processes
the server started and none of their ports listening, keeps the checkpoint and prints
the ``--resume`` command; the completed run has the adapter of the same federation run
uninterrupted (``torch.equal``). The extra record is refused by name in every round, the
lying evaluation dropped: every held-out loss is the honest clients' token-weighted mean
of their own numbers.

The second client runs without ``--state-dir`` (its default, persistent folder under
``XDG_STATE_HOME``). After serving the second start it is stopped; when it comes back,
the server it finds is an attacker's start (``replay_app``: anyone who can submit runs
to the SuperLink and kept the first start's sealed run config, but holds no key to seal
a new one) serving that config unchanged: the restarted client refuses it from its pins
on disk, naming the run whose seal it replays, and then serves the third start. Every
folder of the run directory and of that client's state is 0700, every file 0600.
SIGTERM of a ``fedtune client`` stops its SuperNode too."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import tomllib
import torch
from safetensors.torch import load_file

from tests.deploy import harness as h
from tests.deploy.replay_app import NODES, REPLAYED

pytestmark = [pytest.mark.timeout(900), pytest.mark.e2e]

SETS = ["data.num_clients=3", "run.rounds=2", "federation.min_clients=2",
        "federation.round_timeout=300"]
BLOAT = ["--app", "tests.deploy.bloat_app:app"]


#: the client started without --state-dir, and restarted
RESTARTED = 1
XDG = "XDG_STATE_HOME"
#: the most held-out tokens an honest client has here: data.max_eval_sequences x seq_len
EVAL_TOKEN_CAP = 8 * 32


def _tree(proc: h.Proc) -> list[psutil.Process]:
    root = psutil.Process(proc.process.pid)
    return [root, *root.children(recursive=True)]


def _names(proc: h.Proc) -> set[str]:
    names = set()
    for process in _tree(proc):
        try:
            names.add(_label(process))
        except psutil.NoSuchProcess:
            pass
    return names


def _label(process: psutil.Process) -> str:
    """A Flower script's own name (the kernel keeps 15 characters of it, psutil's name()
    too, as the interpreter comes first on its command line)."""
    line = process.cmdline()
    for part in line[:2]:
        if Path(part).name.startswith(("flower-", "flwr-")):
            return Path(part).name
    if line[1:2] == ["-m"] and len(line) > 2:  # fedtune's SuperLink launcher, a module
        return line[2]
    return process.name()


def _listening(processes: list[psutil.Process]) -> set[int]:
    ports = set()
    for process in processes:
        try:
            ports |= {c.laddr.port for c in process.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return ports


def _alive(processes: list[psutil.Process]) -> list[str]:
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {' '.join(process.cmdline()[:3])}")
        except psutil.NoSuchProcess:
            pass
    return left


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.3)
    return condition()


def _trains_received(state: Path) -> int:
    """How many train messages the client's SuperNode has received whole (its log
    holds every start of the client)."""
    try:
        log = (state / "supernode.log").read_text(errors="replace")
    except OSError:
        return 0
    return sum("Received successfully" in part
               for part in log.split("Receiving: train message")[1:])


def _not_private(folder: Path) -> list[str]:
    wrong = []
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        if mode != want:
            wrong.append(f"{path.relative_to(folder)}: {oct(mode)}")
    return wrong


def _client(tmp: Path, port: int, made, files: list[Path], i: int,
            log_name: str | None = None) -> h.Proc:
    extra = ["--root-certificates", str(made.ca_cert), "--auth-key", str(made.node_keys[i]),
             *(BLOAT if i == 2 else [])]
    if i != RESTARTED:
        return h.client(tmp, port, files[i], extra)
    # no --state-dir: the client's default folder, as a service would run it
    args = [*h.FEDTUNE, "client", "--server", f"127.0.0.1:{port}", "--data", str(files[i]),
            *extra]
    return h.Proc(args, tmp / f"{log_name or files[i].stem}.log", {XDG: str(tmp / "xdg")})


def _default_state(tmp: Path, name: str) -> Path:
    """The state folder the client without --state-dir made (one per server and name)."""
    found = list((tmp / "xdg").glob(f"fedtune/clients/*/{name}"))
    assert len(found) == 1, found
    return found[0]


def _stop(proc: h.Proc, signum: int, group: bool, ports: set[int]) -> dict:
    """Signal a running server (its own pid, or its whole process group as a terminal's
    Ctrl-C does) and note what of the tree it had is left."""
    tree = _tree(proc)
    seen = {"names": sorted(_names(proc)), "ports": _listening(tree) | ports}
    if group:
        os.killpg(proc.process.pid, signum)
    else:
        os.kill(proc.process.pid, signum)
    seen["code"] = proc.wait(90)
    seen["left"] = _alive(tree)
    seen["listening"] = sorted(p for p in seen["ports"] if _answers(p))
    return seen


def _stop_client(proc: h.Proc) -> tuple[int, list[str], list[str]]:
    tree = _tree(proc)
    names = sorted(_names(proc))
    os.kill(proc.process.pid, signal.SIGTERM)
    return proc.wait(60), _alive(tree), names


def _answers_of(log: Path, timeout: float) -> dict:
    from tests.deploy.replay_app import ANSWERS

    def found() -> str | None:
        text = log.read_text(errors="replace") if log.is_file() else ""
        return next((line.split(ANSWERS, 1)[1] for line in text.splitlines()
                     if ANSWERS in line), None)

    assert _wait_until(lambda: found() is not None, timeout), \
        f"the replayed run got no answers in {timeout} s:\n{log.read_text()[-3000:]}"
    return json.loads(found())


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    from fedtune.deploy.certs import make_certificates

    tmp = tmp_path_factory.mktemp("lifecycle")
    made = make_certificates(tmp / "certs", nodes=3)
    allowed = tmp / "certs" / "allowed.pub"
    allowed.write_text("".join(p.read_text() for p in made.node_public_keys))
    tls = [f"server.ca_cert='{made.ca_cert}'", f"server.cert='{made.cert}'",
           f"server.key='{made.key}'", f"server.auth_keys='{allowed}'"]
    port = h.free_port()
    files = h.client_files(tmp / "data", 3)
    server = h.server(tmp, port, [*SETS, *tls])
    procs: list = [server]
    seen: dict = {}
    try:
        run_dir = h.run_dir_of(server)
        # what the attacker keeps of this start: its sealed run config
        sealed_app = (run_dir / "flower" / "app" / "pyproject.toml").read_text()
        clients = [_client(tmp, port, made, files, i) for i in range(3)]
        procs += clients
        assert _wait_until(lambda: list((tmp / "xdg").glob("fedtune/clients/*/client1")), 120)
        states = [tmp / "state-client0", _default_state(tmp, "client1"),
                  tmp / "state-client2"]
        h.wait_for_round(run_dir, 1, 300)
        assert _wait_until(lambda: (run_dir / "checkpoint.pt").is_file(), 30)
        # stop the server while the clients train round 2, not while their SuperNodes
        # pull its message: flwr 1.41's SuperNode keeps the task of a message whose pull
        # the server's end cut, and the worker then waits for its objects (up to 2 h)
        # instead of serving the resumed run's messages
        _wait_until(lambda: all(_trains_received(s) >= 2 for s in states), 120)
        seen["sigterm"] = _stop(server, signal.SIGTERM, group=False, ports={port})
        seen["sigterm_status"] = h.summary(run_dir)["status"]
        seen["sigterm_checkpoint"] = (run_dir / "checkpoint.pt").is_file()

        before = [_trains_received(s) for s in states]
        resumed = h.Proc([*h.FEDTUNE, "server", "--resume", str(run_dir), "--set",
                          "run.rounds=3"], tmp / "resumed.log")
        procs.append(resumed)
        # the clients hold round 2's message (each has served this start's sealed run),
        # none is still pulling it
        assert _wait_until(lambda: all(_trains_received(s) - b >= 1
                                       for s, b in zip(states, before, strict=True))
                           or resumed.process.poll() is not None, 300)
        assert resumed.process.poll() is None, resumed.output()[-3000:]
        # the second client's machine goes down (its client stopped as a service is: it
        # leaves the server), then Ctrl-C in the server's terminal
        seen["first_client1"] = _stop_client(clients[RESTARTED])
        checkpoint = (run_dir / "checkpoint.pt").read_bytes()
        seen["sigint"] = _stop(resumed, signal.SIGINT, group=True, ports={port})
        seen["sigint_checkpoint_kept"] = (run_dir / "checkpoint.pt").read_bytes() == checkpoint
        seen["sigint_summary"] = h.summary(run_dir)

        # the attacker's start: the first start's sealed run, with its own ServerApp;
        # the second client's machine is back (its client without --state-dir)
        kept = tmp / "kept-pyproject.toml"
        kept.write_text(sealed_app)
        replayer = h.Proc([sys.executable, "-m", "tests.deploy.replay_app", "server",
                           "--resume", str(run_dir)], tmp / "replayer.log",
                          {REPLAYED: str(kept), NODES: "3"})
        procs.append(replayer)
        h.run_dir_of(replayer)  # announced once its front serves the clients
        restarted = _client(tmp, port, made, files, RESTARTED, "client1-restarted")
        procs.append(restarted)
        replay = _answers_of(run_dir / "flower" / "superlink.log", 300)
        seen["replay_run"], seen["replay_answers"] = replay["run_id"], replay["answers"]
        seen["replayer_code"] = replayer.wait(120)

        final = h.resume(tmp, run_dir, "final")
        procs.append(final)
        final_code = final.wait(400)
        seen["client0"] = _stop_client(clients[0])
        seen["restarted"] = _stop_client(restarted)
    finally:
        for p in reversed(procs):
            p.stop()
    return SimpleNamespace(tmp=tmp, run_dir=run_dir, files=files, sealed_app=sealed_app,
                           server=server, resumed=resumed, restarted=restarted, final=final,
                           final_code=final_code, seen=seen)


def test_sigterm_stops_every_process_of_the_server_and_says_how_to_resume(lifecycle):
    run_dir, seen = lifecycle.run_dir, lifecycle.seen["sigterm"]
    # the tree that had to be stopped
    assert {"fedtune.deploy.superlink", "flwr-serverapp"} <= set(seen["names"]), \
        seen["names"]
    assert seen["code"] == 128 + signal.SIGTERM, lifecycle.server.output()[-3000:]
    assert seen["left"] == [], seen["left"]
    assert seen["listening"] == [], f"still listening on {seen['listening']}"
    assert lifecycle.seen["sigterm_status"] == "stopped"
    assert lifecycle.seen["sigterm_checkpoint"]
    assert f"fedtune server --resume {run_dir}" in lifecycle.server.output()


def test_ctrl_c_stops_every_process_of_the_server_and_keeps_the_checkpoint(lifecycle):
    run_dir, seen = lifecycle.run_dir, lifecycle.seen["sigint"]
    output = lifecycle.resumed.output()
    assert {"fedtune.deploy.superlink", "flwr-serverapp"} <= set(seen["names"]), \
        seen["names"]
    assert seen["code"] == 128 + signal.SIGINT == 130, output[-3000:]
    assert seen["left"] == [], seen["left"]
    assert seen["listening"] == [], f"still listening on {seen['listening']}"
    summary = lifecycle.seen["sigint_summary"]
    assert summary["status"] == "stopped" and "SIGINT" in summary["error"]
    # the checkpoint of the last completed round, untouched (the third start resumes it)
    assert lifecycle.seen["sigint_checkpoint_kept"]
    done = summary["rounds"][-1]["round"]
    assert f"checkpoint after round {done} kept" in output
    assert f"fedtune server --resume {run_dir}" in output


def test_resume_with_more_rounds_ends_with_the_uninterrupted_adapter(lifecycle):
    from tests.deploy.bloat_app import refused

    run_dir = lifecycle.run_dir
    assert lifecycle.final_code == 0, lifecycle.final.output()[-3000:]
    summary = h.summary(run_dir)
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["scenario"]["run"]["rounds"] == 3
    names = [(f.stem, f) for f in lifecycle.files]
    reference = h.in_process_run(run_dir, names, lifecycle.tmp / "reference",
                                 {"client2": refused})
    assert [r["eval_loss"] for r in summary["rounds"]] == \
        [r["eval_loss"] for r in h.summary(reference)["rounds"]]
    a = load_file(reference / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_update_with_an_extra_record_is_refused_by_name_every_round(lifecycle):
    for record in h.summary(lifecycle.run_dir)["rounds"]:
        assert record["clients_replied"] == 2
        assert len(record["dropped"]) == 1, record["dropped"]
        assert "reply carries records it may not: ['payload']" in record["dropped"][0]


def test_a_10_15_token_evaluation_is_dropped_and_the_loss_is_the_honest_clients(lifecycle):
    """The federated held-out loss of every round, recomputed from the per-client numbers
    the run recorded (metrics.jsonl): the two honest clients' token-weighted mean."""
    run_dir = lifecycle.run_dir
    records = [json.loads(line) for line in
               (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if r.get("phase") == "eval"]
    assert evaluations and all(r["eval_tokens"] <= EVAL_TOKEN_CAP for r in evaluations), \
        [r["eval_tokens"] for r in evaluations]
    summary = h.summary(run_dir)
    reported = {0: summary["initial"]["eval_loss"],
                **{r["round"]: r["eval_loss"] for r in summary["rounds"]}}
    assert sorted(reported) == [0, 1, 2, 3]
    for round_number, loss in reported.items():
        honest = [(r["eval_loss"], r["eval_tokens"]) for r in evaluations
                  if r["round"] == round_number]
        assert len(honest) == 2, (round_number, honest)
        expected = sum(lo * t for lo, t in honest) / sum(t for _, t in honest)
        assert loss == pytest.approx(expected, rel=1e-12), (round_number, loss, honest)
        assert loss > 1.0  # not the liar's 0.01
    log = (run_dir / "flower" / "superlink.log").read_text(errors="replace")
    dropped = [line for line in log.splitlines() if "ignored the evaluation on node" in line
               and "eval-tokens 1000000000000000 exceeds the 256 held-out tokens" in line]
    assert len(dropped) == 4, dropped  # rounds 0 and 1 (first start), 2 and 3


def test_a_restarted_client_without_state_dir_refuses_an_older_seal(lifecycle):
    seen, replay = lifecycle.seen, lifecycle.seen["replay_run"]
    refusal = f"run {replay} replays the seal of run "
    # every client refused the replayed run, the restarted one from its pins on disk
    answers = seen["replay_answers"]
    assert len(answers) == 3, answers
    assert all(a.startswith(f"run refused by this client: {refusal}")
               for a in answers.values()), answers
    log = lifecycle.restarted.output()
    assert f"refused a message of run {replay}: {refusal}" in log, log[-3000:]
    # the run whose seal it replays: the first start's (its nonce, pinned to that run)
    config = tomllib.loads(lifecycle.sealed_app)["tool"]["flwr"]["app"]["config"]
    nonce = json.loads(json.loads(config["fedtune-seal"])["statement"])["nonce"]
    pins = json.loads((_default_state(lifecycle.tmp, "client1") / "run-pins.json").read_text())
    assert len(pins["runs"]) == 3  # the three starts' seals, each pinned to its run
    assert all(a == f"run refused by this client: {refusal}{pins['runs'][nonce]}"
               for a in answers.values()), (answers, pins)
    # the restarted client went on serving the server's own run, then stopped cleanly
    first_code, _, _ = seen["first_client1"]
    code, left, _ = seen["restarted"]
    assert first_code == 0 and code == 0 and left == [], (first_code, code, left)
    assert "message 2 done (completed)" in log, log[-3000:]


def test_the_run_directory_and_a_clients_state_are_private(lifecycle):
    run_dir = lifecycle.run_dir
    assert (run_dir / "flower" / "state.db").is_file()
    assert _not_private(run_dir) == []
    # the default state folder, made by the client, and the folders above it
    assert (_default_state(lifecycle.tmp, "client1") / "run-pins.json").is_file()
    assert _not_private(lifecycle.tmp / "xdg") == []
    assert _not_private(lifecycle.tmp / "state-client0") == []


def test_sigterm_of_a_client_stops_its_supernode(lifecycle):
    code, left, names = lifecycle.seen["client0"]
    assert "flower-supernode" in names, names
    assert code == 0
    assert left == [], left
