"""Run seals and name binding without processes: a sealed config survives Flower's own
FAB build and config fusion; any change, another CA, another host, a replayed or older
seal is refused; a name stays with the first key that claimed it."""

from __future__ import annotations

import json

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_fused_config_from_fab
from flwr.supercore.run import Run

from fedtune.config import ServerSpec, build_scenario
from fedtune.deploy.certs import make_certificates
from fedtune.deploy.seal import SEAL_KEY, RunPin, RunRefused, open_seal, seal_config
from fedtune.deploy.server import app_config, check_security, write_app
from fedtune.flower.identity import NameKeys, key_fingerprint


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"), ["fl.example", "127.0.0.1"])


@pytest.fixture(scope="module")
def sealed(certs, tmp_path_factory):
    """The run config a server submits: the whole scenario, sealed."""
    scenario = build_scenario({"data": {"num_clients": 3}})
    run_dir = tmp_path_factory.mktemp("run")
    return seal_config(app_config(scenario, run_dir, False), certs.cert, certs.key)


def _as_received(config: dict, folder, overrides: dict | None = None) -> dict:
    """What a client's context holds: Flower builds the FAB and fuses its config with
    the run's overrides (the same functions the SuperNode uses)."""
    fab = build_fab_from_disk(write_app(folder, config))
    run = Run.create_empty(1)
    run.override_config = dict(overrides or {})
    return get_fused_config_from_fab(fab, run)


def test_the_sealed_config_opens_after_flowers_fab_round_trip(sealed, certs, tmp_path):
    received = _as_received(sealed, tmp_path / "app")
    for host in ("fl.example", "127.0.0.1"):
        assert open_seal(received, certs.ca_cert, host)["nonce"]


@pytest.mark.parametrize("change", [
    {"train.steps": 999},  # another training scenario
    {"privacy.noise_multiplier": 123.0},
    {"run-dir": "/tmp/elsewhere"},
])
def test_any_other_config_is_refused(sealed, certs, tmp_path, change):
    key = next(iter(change))
    assert key in sealed and sealed[key] != change[key]
    as_override = _as_received(sealed, tmp_path / "a", overrides=change)
    with pytest.raises(RunRefused, match="not the one the server signed"):
        open_seal(as_override, certs.ca_cert, "fl.example")
    in_the_app = _as_received({**sealed, **change}, tmp_path / "b")
    with pytest.raises(RunRefused, match="not the one the server signed"):
        open_seal(in_the_app, certs.ca_cert, "fl.example")


def test_another_ca_another_host_or_no_seal_is_refused(sealed, certs, tmp_path):
    other = make_certificates(tmp_path / "other", ["fl.example"])
    with pytest.raises(RunRefused, match="not by the server"):
        open_seal(sealed, other.ca_cert, "fl.example")
    with pytest.raises(RunRefused, match="not by the server"):
        open_seal(sealed, certs.ca_cert, "other.example")
    # a seal made with the other CA's server key over this very config
    forged = seal_config(sealed, other.cert, other.key)
    with pytest.raises(RunRefused, match="not by the server"):
        open_seal(forged, certs.ca_cert, "fl.example")
    unsealed = {k: v for k, v in sealed.items() if k != SEAL_KEY}
    with pytest.raises(RunRefused, match="not sealed"):
        open_seal(unsealed, certs.ca_cert, "fl.example")


def test_a_tampered_statement_or_signature_is_refused(sealed, certs):
    seal = json.loads(sealed[SEAL_KEY])
    statement = json.loads(seal["statement"])
    statement["issued_at"] += 1000  # a fresher-looking seal
    tampered = {**sealed, SEAL_KEY: json.dumps({**seal, "statement": json.dumps(statement)})}
    with pytest.raises(RunRefused, match="bad signature"):
        open_seal(tampered, certs.ca_cert, "fl.example")
    with pytest.raises(RunRefused, match="malformed"):
        open_seal({**sealed, SEAL_KEY: "{not json"}, certs.ca_cert, "fl.example")


def test_a_pin_serves_each_seal_for_one_run_and_never_an_older_one(certs, sealed, tmp_path):
    state = tmp_path / "pins.json"
    pin = RunPin(certs.ca_cert, "fl.example", state)
    pin.check(7, sealed)
    pin.check(7, sealed)  # every message of the run
    with pytest.raises(RunRefused, match="replays the seal of run 7"):
        pin.check(8, sealed)
    newer = seal_config(sealed, certs.cert, certs.key)  # a resumed server's new run
    pin.check(9, newer)
    restarted = RunPin(certs.ca_cert, "fl.example", state)  # remembers, from the file
    with pytest.raises(RunRefused, match="replays the seal of run 7"):
        restarted.check(10, sealed)
    fresh = RunPin(certs.ca_cert, "fl.example", tmp_path / "other.json")
    fresh.check(9, newer)
    with pytest.raises(RunRefused, match="sealed before the newest run"):
        fresh.check(11, sealed)


def test_tls_without_node_authentication_needs_an_explicit_choice(certs):
    tls = {"ca_cert": str(certs.ca_cert), "cert": str(certs.cert), "key": str(certs.key)}
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match="allow_unauthenticated_clients"):
        check_security(ServerSpec(**tls))
    check_security(ServerSpec(**tls, allow_unauthenticated_clients=True))
    check_security(ServerSpec(insecure=True))


def test_a_name_stays_with_the_first_key_that_claimed_it():
    names = NameKeys()
    alice, mallory = b"alice-key", b"mallory-key"
    assert names.admit({5: ("alice", "")}, {5: alice}) == {5: ("alice", "")}
    # another key claiming the name is refused; the owner rejoining is admitted
    assert names.admit({6: ("alice", "x")}, {6: mallory}) == {}
    assert "belongs to key " + key_fingerprint(alice) in names.refused[-1]
    assert names.admit({7: ("alice", "")}, {7: alice}) == {7: ("alice", "")}
    assert names.admit({8: ("bob", "")}, {}) == {}  # a node without a key
    assert len(names.take_refused()) == 2 and names.take_refused() == []
    # the binding survives a checkpoint
    again = NameKeys(names.state())
    assert again.admit({9: ("alice", "")}, {9: mallory}) == {}


def test_a_server_certificate_with_an_intermediate_ca_seals_too(tmp_path):
    """Operators' certificates often come as leaf + intermediate in one file."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)

    def issue(subject, issuer, issuer_key, public, ca):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(public).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=1))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       issuer_key.public_key()), False))
        if ca:
            builder = builder.add_extension(usage, True)
        else:
            builder = (builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("fl.example")]), False).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False))
        return builder.sign(issuer_key, hashes.SHA256())

    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = issue("root", "root", root_key, root_key.public_key(), True)
    mid = issue("mid", "root", root_key, mid_key.public_key(), True)
    leaf = issue("fl.example", "mid", mid_key, leaf_key.public_key(), False)
    pem = serialization.Encoding.PEM
    (tmp_path / "root.crt").write_bytes(root.public_bytes(pem))
    (tmp_path / "chain.pem").write_bytes(leaf.public_bytes(pem) + mid.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    sealed = seal_config({"a": 1}, tmp_path / "chain.pem", tmp_path / "leaf.key")
    assert open_seal(sealed, tmp_path / "root.crt", "fl.example")["nonce"]


def _sealed_at(config: dict, certs, issued_at: float) -> dict:
    """``config`` sealed as a server would have sealed it at ``issued_at``."""
    from unittest import mock

    with mock.patch("fedtune.deploy.seal.time.time", return_value=issued_at):
        return seal_config(config, certs.cert, certs.key)


def test_a_seal_first_seen_long_after_its_issue_is_refused(certs, sealed, tmp_path):
    import time

    from fedtune.deploy.seal import SEAL_MAX_AGE

    now = time.time()
    old = _sealed_at(sealed, certs, now - SEAL_MAX_AGE - 60)
    pin = RunPin(certs.ca_cert, "fl.example", tmp_path / "pins.json")
    with pytest.raises(RunRefused, match="sealed 24.0 h ago"):
        pin.check(1, old)
    with pytest.raises(RunRefused, match="a clock far off"):  # issued in the future
        pin.check(2, _sealed_at(sealed, certs, now + 3600))
    recent = _sealed_at(sealed, certs, now - SEAL_MAX_AGE + 600)
    pin.check(3, recent)
    # a run served once goes on being served after its window (a long run's rounds)
    later = RunPin(certs.ca_cert, "fl.example", tmp_path / "pins.json", max_age=1.0)
    later.check(3, recent)


def test_a_restarted_client_without_state_dir_refuses_an_older_seal(
        certs, sealed, tmp_path, monkeypatch):
    """The state folder a client gets without --state-dir: the same after a restart
    (per user, server and name), private to its user, and its pins refuse a seal older
    than the one served before the restart."""
    import stat

    from fedtune.deploy.client import ClientOptions, prepare_state_dir, run_pin

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    options = ClientOptions(server="fl.example:9092", data=str(tmp_path / "alice.txt"),
                            root_certificates=str(certs.ca_cert))
    state = prepare_state_dir(options)
    server_folder, name_folder = state.relative_to(tmp_path / "xdg" / "fedtune" / "clients").parts
    assert server_folder.startswith("fl.example_9092") and name_folder == "alice"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    newer = seal_config(sealed, certs.cert, certs.key)  # the server restarted: new seal
    run_pin(options, state).check(2, newer)
    restarted = prepare_state_dir(options)  # a new process, the same options
    assert restarted == state
    with pytest.raises(RunRefused, match="sealed before the newest run"):
        run_pin(options, restarted).check(1, sealed)
    # another name or another server: another folder, another set of pins
    assert prepare_state_dir(ClientOptions(server="fl.example:9092", data="x",
                                           name="bob")) != state
    assert prepare_state_dir(ClientOptions(server="other.example:9092",
                                           data=options.data)) != state


def test_a_shared_folder_is_refused_as_state_dir(tmp_path):
    from fedtune.deploy.client import ClientError, ClientOptions, prepare_state_dir

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)  # as /tmp
    with pytest.raises(ClientError, match="writable by every user"):
        prepare_state_dir(ClientOptions(server="h:1", data="d", state_dir=str(shared)))
    assert shared.stat().st_mode & 0o7777 == 0o1777  # left as it was
