"""A malicious server against real ``fedtune client`` processes (localhost, tiny model):
the operator runs ``fedtune server`` with its own ServerApp (``tests.deploy.evil_serve``),
which asks one client for what the run's scenario does not order: dp-fields = B, no
DP-SGD, a weaker z and C, and a third train message in a two-round run (the in-process
test of test_client_enforcement plays every attack). Each is refused with the setting named;
what the honest messages got back is the noised update and no number about the data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.deploy import harness as h
from tests.flower.evil_server import DEPLOYED
from tests.flower.test_client_enforcement import SEALED, check_attacked

pytestmark = [pytest.mark.timeout(600), pytest.mark.e2e]


def _evil_server(tmp: Path, port: int, sets: list[str]) -> h.Proc:
    """``harness.server``'s command line, run by ``evil_serve`` instead of the CLI."""
    args = [sys.executable, "-m", "tests.deploy.evil_serve", "server", "-c",
            str(h.REPO / "server" / "server.toml"), "--out", str(tmp / "runs"),
            "--set", f"server.address='127.0.0.1:{port}'", "--insecure"]
    for s in [*h.TINY, *sets]:
        args += ["--set", s]
    return h.Proc(args, tmp / "evil-server.log")


def test_a_malicious_server_is_refused_by_real_clients(tmp_path):
    port = h.free_port()
    files = h.client_files(tmp_path / "data", 2)
    server = _evil_server(tmp_path, port, ["data.num_clients=2", "federation.round_timeout=120",
                                           *SEALED])
    clients: list[h.Proc] = []
    try:
        run_dir = h.run_dir_of(server)
        clients = [h.client(tmp_path, port, f, ["--insecure"]) for f in files]
        server.wait(400)  # it ends in an error: the attack writes no summary
    finally:  # the attack is over: no need to let the clients leave gracefully
        for c in [*clients, server]:
            c.kill()
    attack = run_dir / "attack.json"
    assert attack.is_file(), server.output()[-3000:]
    check_attacked(json.loads(attack.read_text()), DEPLOYED)
