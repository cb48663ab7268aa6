"""A malicious server against real ``fedtune client`` processes (localhost, tiny model,
TLS and node authentication): the operator runs ``fedtune server`` with its own
ServerApp (``tests.deploy.evil_serve``). The server process seals the honest scenario
with its own TLS key, as a real operator's would (fedavg, distributed DP, DP-SGD, secure
aggregation, two rounds), and the clients check that seal against the CA they trust;
then its ServerApp asks one client for what that scenario does not order: dp-fields = B,
no DP-SGD, a weaker z and C, a SecAgg threshold of 1, and a third train message in a
two-round run (the in-process test of test_client_enforcement plays every attack).
Each is refused with the setting named; the honest messages got back the secure
round's two public keys and no number about the data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedtune.deploy.client import PIN_FILE
from tests.deploy import harness as h
from tests.flower.evil_server import DEPLOYED
from tests.flower.test_client_enforcement import SEALED_SECURE, check_attacked

pytestmark = [pytest.mark.timeout(600), pytest.mark.e2e]


def _evil_server(tmp: Path, port: int, sets: list[str], made, allowed: Path) -> h.Proc:
    """``harness.server``'s command line with TLS and node authentication, run by
    ``evil_serve`` instead of the CLI."""
    args = [sys.executable, "-m", "tests.deploy.evil_serve", "server", "-c",
            str(h.REPO / "server" / "server.toml"), "--out", str(tmp / "runs"),
            "--set", f"server.address='127.0.0.1:{port}'",
            "--set", f"server.ca_cert='{made.ca_cert}'", "--set", f"server.cert='{made.cert}'",
            "--set", f"server.key='{made.key}'", "--set", f"server.auth_keys='{allowed}'"]
    for s in [*h.TINY, *sets]:
        args += ["--set", s]
    return h.Proc(args, tmp / "evil-server.log")


def test_a_malicious_server_is_refused_by_real_clients(tmp_path):
    from fedtune.deploy.certs import make_certificates

    made = make_certificates(tmp_path / "certs", nodes=2)
    allowed = tmp_path / "certs" / "allowed.pub"
    allowed.write_text("".join(p.read_text() for p in made.node_public_keys))
    port = h.free_port()
    files = h.client_files(tmp_path / "data", 2)
    server = _evil_server(tmp_path, port, ["data.num_clients=2",
                                           "federation.round_timeout=120", *SEALED_SECURE],
                          made, allowed)
    clients: list[h.Proc] = []
    try:
        run_dir = h.run_dir_of(server)
        clients = [h.client(tmp_path, port, f, ["--root-certificates", str(made.ca_cert),
                                                "--auth-key", str(key)])
                   for f, key in zip(files, made.node_keys, strict=True)]
        server.wait(400)  # it ends in an error: the attack writes no summary
    finally:  # the attack is over: no need to let the clients leave gracefully
        for c in [*clients, server]:
            c.kill()
    attack = run_dir / "attack.json"
    assert attack.is_file(), server.output()[-3000:]
    captured = json.loads(attack.read_text())
    check_attacked(captured, DEPLOYED, secure=True)
    assert all(c["refused"].startswith("client 'client") for c in captured if "refused" in c)
    # each client checked the run's seal (the server's, over the honest scenario) before
    # it served a message: the seal's nonce is pinned in its state folder
    nonce = _sealed_nonce(run_dir)
    for f in files:
        pins = json.loads((tmp_path / f"state-{f.stem}" / PIN_FILE).read_text())
        assert nonce in pins["runs"], pins


def _sealed_nonce(run_dir: Path) -> str:
    """The nonce of the seal ``fedtune server`` put into the run's config."""
    import tomllib

    from fedtune.deploy.seal import SEAL_KEY

    project = tomllib.loads((run_dir / "flower" / "app" / "pyproject.toml").read_text())
    seal = json.loads(project["tool"]["flwr"]["app"]["config"][SEAL_KEY])
    assert json.loads(seal["statement"])["config_sha256"]
    return str(json.loads(seal["statement"])["nonce"])
