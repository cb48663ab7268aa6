"""A deployed server's lifecycle, with real processes on localhost (tiny model, TLS and
node authentication, three clients, one of which adds a 24 MB extra record to every
update). SIGTERM of ``fedtune server`` (to its own pid, as ``kill PID`` does) mid-run
leaves none of the processes it started and none of their ports listening, keeps the
checkpoint and prints the ``--resume`` command; ``--resume --set run.rounds=3`` then
completes with the adapter of the same federation run uninterrupted for three rounds
(``torch.equal``). The extra record is refused by name in every round. Every folder of
the run directory and of a client's state folder is 0700, every file 0600. SIGTERM of a
``fedtune client`` stops its SuperNode too."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.deploy import harness as h

pytestmark = [pytest.mark.timeout(900), pytest.mark.e2e]

SETS = ["data.num_clients=3", "run.rounds=2", "federation.min_clients=2",
        "federation.round_timeout=300"]
BLOAT = ["--app", "tests.deploy.bloat_app:app"]


def _tree(proc: h.Proc) -> list[psutil.Process]:
    root = psutil.Process(proc.process.pid)
    return [root, *root.children(recursive=True)]


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


def _holds_train(state: Path, count: int) -> bool:
    """Whether the client's SuperNode has received its ``count``-th train message whole."""
    try:
        log = (state / "supernode.log").read_text(errors="replace")
    except OSError:
        return False
    received = log.split("Receiving: train message")
    return len(received) > count and "Received successfully" in received[count]


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
    clients, resumed, seen = [], None, {}
    try:
        run_dir = h.run_dir_of(server)
        clients = [h.client(tmp, port, f, ["--root-certificates", str(made.ca_cert),
                                           "--auth-key", str(k)] + (BLOAT if i == 2 else []))
                   for i, (f, k) in enumerate(zip(files, made.node_keys, strict=True))]
        h.wait_for_round(run_dir, 1, 300)
        assert _wait_until(lambda: (run_dir / "checkpoint.pt").is_file(), 30)
        # stop the server while the clients train round 2, not while their SuperNodes
        # pull its message: a pull cut by the server's end has been seen to leave a
        # SuperNode that never hands its worker the resumed run's first message
        _wait_until(lambda: all(_holds_train(tmp / f"state-{f.stem}", 2) for f in files[:2]),
                    120)
        tree = _tree(server)
        seen["names"] = sorted({_label(p) for p in tree})
        seen["ports"] = _listening(tree) | {port}
        os.kill(server.process.pid, signal.SIGTERM)  # the server's own pid: `kill PID`
        seen["code"] = server.wait(90)
        seen["left"] = _alive(tree)
        seen["listening"] = sorted(p for p in seen["ports"] if _answers(p))
        seen["status"] = h.summary(run_dir)["status"]
        seen["checkpoint"] = (run_dir / "checkpoint.pt").is_file()
        resumed = h.Proc([*h.FEDTUNE, "server", "--resume", str(run_dir), "--set",
                          "run.rounds=3"], tmp / "resumed.log")
        resumed_code = resumed.wait(400)
        client_tree = _tree(clients[0])
        seen["client_names"] = sorted({_label(p) for p in client_tree})
        os.kill(clients[0].process.pid, signal.SIGTERM)
        seen["client_code"] = clients[0].wait(60)
        seen["client_left"] = _alive(client_tree)
    finally:
        for c in [*clients, server, *([resumed] if resumed else [])]:
            c.stop()
    return tmp, run_dir, server, resumed, resumed_code, seen, files


def test_sigterm_stops_every_process_of_the_server_and_says_how_to_resume(lifecycle):
    _, run_dir, server, _, _, seen, _ = lifecycle
    # the tree that had to be stopped
    assert {"fedtune.deploy.superlink", "flwr-serverapp"} <= set(seen["names"]), \
        seen["names"]
    assert seen["code"] == 128 + signal.SIGTERM, server.output()[-3000:]
    assert seen["left"] == [], seen["left"]
    assert seen["listening"] == [], f"still listening on {seen['listening']}"
    assert seen["status"] == "stopped" and seen["checkpoint"]
    assert f"fedtune server --resume {run_dir}" in server.output()


def test_resume_with_more_rounds_ends_with_the_uninterrupted_adapter(lifecycle):
    from tests.deploy.bloat_app import refused

    tmp, run_dir, _, resumed, code, _, files = lifecycle
    assert code == 0, resumed.output()[-3000:]
    summary = h.summary(run_dir)
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["scenario"]["run"]["rounds"] == 3
    names = [(f.stem, f) for f in files]
    reference = h.in_process_run(run_dir, names, tmp / "reference", {"client2": refused})
    assert [r["eval_loss"] for r in summary["rounds"]] == \
        [r["eval_loss"] for r in h.summary(reference)["rounds"]]
    a = load_file(reference / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_update_with_an_extra_record_is_refused_by_name_every_round(lifecycle):
    _, run_dir, _, resumed, _, _, _ = lifecycle
    for record in h.summary(run_dir)["rounds"]:
        assert record["clients_replied"] == 2
        assert len(record["dropped"]) == 1, record["dropped"]
        assert "reply carries records it may not: ['payload']" in record["dropped"][0]


def test_the_run_directory_and_a_clients_state_are_private(lifecycle):
    tmp, run_dir, _, _, _, _, _ = lifecycle
    assert (run_dir / "flower" / "state.db").is_file()
    assert _not_private(run_dir) == []
    assert _not_private(tmp / "state-client1") == []


def test_sigterm_of_a_client_stops_its_supernode(lifecycle):
    *_, seen, _ = lifecycle
    assert "flower-supernode" in seen["client_names"], seen["client_names"]
    assert seen["client_code"] == 0
    assert seen["client_left"] == [], seen["client_left"]
