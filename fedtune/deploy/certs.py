"""Test certificates and node keys for a local or lab federation (``fedtune certs``).

Made with the ``cryptography`` package Flower already depends on, so no openssl or
ssh-keygen is needed: a CA, a server certificate signed by it for the given host
names / IPs, and ECDSA P-384 key pairs in OpenSSH format for Flower's node
authentication (one per client). For production use certificates from your own CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certificates:
    """Where ``make_certificates`` put everything."""

    ca_cert: Path
    cert: Path
    key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key is next to each, ``.pub``

    @property
    def node_public_keys(self) -> tuple[Path, ...]:
        return tuple(k.with_suffix(".pub") for k in self.node_keys)


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


#: what a CA certificate may sign (RFC 5280; strict verifiers require it)
_CA_USAGE = x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(folder: str | Path, hosts: list[str] | None = None, nodes: int = 0,
                      days: int = 365) -> Certificates:
    """A CA, a server certificate for ``hosts`` (default localhost, 127.0.0.1) and
    ``nodes`` client key pairs, written into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    hosts = hosts or ["localhost", "127.0.0.1"]
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedtune test CA"))
          .issuer_name(_name("fedtune test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(_CA_USAGE, critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
              .issuer_name(ca.subject).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5))
              .not_valid_after(now + dt.timedelta(days=days))
              .add_extension(_san(hosts), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                             critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                  ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    ca_path = _write(out / "ca.crt", ca.public_bytes(pem))
    cert = _write(out / "server.pem", server.public_bytes(pem))
    key = _write(out / "server.key", _pem_key(server_key), private=True)
    return Certificates(ca_path, cert, key, tuple(make_node_key(out / f"client{i + 1}")
                                                  for i in range(nodes)))


def make_node_key(path: str | Path) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format (``path`` and ``path.pub``), the kind
    ``flower-supernode --auth-supernode-private-key`` expects."""
    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(path.with_suffix(".pub"), public + f" {path.name}\n".encode())
    return path
