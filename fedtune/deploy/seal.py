"""Run seals: a client serves only the runs that the server it joined started.

A SuperLink hands its SuperNodes the messages of every run submitted to it, and a run
carries its whole scenario in its config (DP or not, what to train, what to send back).
So ``fedtune server`` seals each run it submits: it signs a statement (the SHA-256 of
the complete run config, a fresh nonce, the time) with its TLS key, and puts the
statement, the signature and its certificate into the run config. A client checks the
certificate against the CA it was given (``--root-certificates``) and the host it
dialled, exactly as TLS does, then the signature, then that the config it received is
the one signed (so neither another app's config nor a ``--run-config`` override
passes), and that the nonce belongs to no other run (a replayed seal). No new key to
distribute: the client already trusts that CA for that host.

Seals expire: a client serves a seal it has not seen before only if it is newer than
every seal it has served (each server start, a resume included, seals anew) and was
issued less than ``SEAL_MAX_AGE`` ago, so an old sealed config resubmitted later is
refused even by a client that never saw its successor. The pins live in the client's
persistent state folder (``fedtune.deploy.client.default_state_dir``), so a restart
forgets nothing.

Flower's own answer (signed FABs with SuperNode ``--trusted-entities``) needs a licensed
SuperLink to vouch for the FAB, and signs the FAB only, not the run config.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

#: the run-config key holding the seal (a JSON string: run config values are scalars)
SEAL_KEY = "fedtune-seal"
#: seconds after its issue within which a client serves a seal it has never seen: the
#: server seals its run at each start, and its clients join within its wait for them
#: (``server.wait_for_clients``); one that has served the run goes on serving it
SEAL_MAX_AGE = 24 * 3600.0
#: how far ahead of this machine's clock a seal may claim to be issued (clock skew)
CLOCK_SKEW = 300.0


class RunRefused(RuntimeError):
    """This client does not serve that run; the message says why."""


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of the run config without its seal, keys sorted (the order Flower
    fuses a config in must not matter)."""
    body = {k: v for k, v in config.items() if k != SEAL_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _sign(key: Any, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise ValueError(f"server.key: cannot sign with a {type(key).__name__}")


def _verify(public_key: Any, signature: bytes, data: bytes) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, data)
    else:
        raise InvalidSignature(f"unsupported key type {type(public_key).__name__}")


def seal_config(config: Mapping[str, Any], cert_file: str | Path, key_file: str | Path
                ) -> dict[str, Any]:
    """``config`` plus its seal, signed with the server's TLS key."""
    key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    statement = json.dumps({"config_sha256": config_digest(config),
                            "nonce": secrets.token_hex(16), "issued_at": time.time()},
                           sort_keys=True)
    seal = {"statement": statement,
            "signature": base64.b64encode(_sign(key, statement.encode())).decode(),
            "certificate": Path(cert_file).read_text()}
    return {**dict(config), SEAL_KEY: json.dumps(seal)}


def _subject(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def open_seal(config: Mapping[str, Any], ca_file: str | Path, host: str) -> dict[str, Any]:
    """The signed statement of a run config, once the certificate chains to the CA for
    ``host``, the signature holds and the config is the one signed; RunRefused if not."""
    raw = config.get(SEAL_KEY)
    if not isinstance(raw, str):
        raise RunRefused("the run is not sealed by the server (no fedtune-seal in its config)")
    try:
        seal = json.loads(raw)
        # the server's certificate file: its own certificate, then any intermediates
        certificate, *intermediates = x509.load_pem_x509_certificates(
            seal["certificate"].encode())
        signature = base64.b64decode(seal["signature"], validate=True)
        statement_text = seal["statement"]
        statement = json.loads(statement_text)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise RunRefused(f"the run's seal is malformed: {err}") from None
    cas = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
    verifier = PolicyBuilder().store(Store(cas)).build_server_verifier(_subject(host))
    try:
        verifier.verify(certificate, intermediates)
    except VerificationError as err:
        raise RunRefused(f"the run's seal is not by the server {host} this client "
                         f"trusts: {err}") from None
    try:
        _verify(certificate.public_key(), signature, statement_text.encode())
    except InvalidSignature:
        raise RunRefused("the run's seal has a bad signature") from None
    if statement.get("config_sha256") != config_digest(config):
        raise RunRefused("the run's config is not the one the server signed")
    return statement


class RunPin:
    """Which sealed runs this client has served: a run must be sealed by the server at
    ``host`` (checked against ``ca_file``), its nonce may serve one run id only, and a
    new seal must be newer than the newest one seen (the server seals every run it
    starts, a resumed one included) and issued less than ``max_age`` seconds ago. Kept
    in ``state_file`` when given, so a restarted client remembers (a per-message
    process reads it anew for each message)."""

    def __init__(self, ca_file: str | Path, host: str, state_file: str | Path | None = None,
                 max_age: float = SEAL_MAX_AGE) -> None:
        self.ca_file, self.host, self.max_age = str(ca_file), host, max_age
        self.state_file = Path(state_file) if state_file else None
        self.runs: dict[str, int] = {}  # nonce -> run id
        self.newest = 0.0
        if self.state_file is not None and self.state_file.is_file():
            saved = json.loads(self.state_file.read_text())
            self.runs = {str(k): int(v) for k, v in saved.get("runs", {}).items()}
            self.newest = float(saved.get("newest", 0.0))

    def check(self, run_id: int, config: Mapping[str, Any]) -> None:
        """Return if this client serves ``run_id``; RunRefused with the reason if not."""
        statement = open_seal(config, self.ca_file, self.host)
        nonce, issued = str(statement["nonce"]), float(statement["issued_at"])
        if nonce in self.runs:
            if self.runs[nonce] != run_id:
                raise RunRefused(f"run {run_id} replays the seal of run {self.runs[nonce]}")
            return
        if issued < self.newest:
            raise RunRefused(f"run {run_id} is sealed before the newest run this client "
                             "served (an old seal replayed)")
        age = time.time() - issued
        if not -CLOCK_SKEW <= age <= self.max_age:
            raise RunRefused(f"run {run_id} is sealed {age / 3600:.1f} h ago, and this "
                             f"client serves a new seal within {self.max_age / 3600:g} h "
                             "of its issue only (an old seal, or a clock far off); restart "
                             "or resume the server to seal the run anew")
        self.runs[nonce], self.newest = run_id, issued
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps({"runs": self.runs, "newest": self.newest}))
