"""Talking to a SuperLink's Control API from Python: submit a run, watch it, register
client keys. Flower's CLI does the same through these (internal, hence flwr is pinned)
helpers; calling them directly saves a ``flwr`` process and a config file per call.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.cli.build import build_fab_from_disk
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.fab import Fab

from fedtune.deploy.superlink import OPERATOR_HEADER, operator_secret_beside


class ControlError(RuntimeError):
    """The SuperLink refused or failed a request."""


def _client(address: str, ca_cert: str | None) -> Any:
    """A Control API client of fedtune's loopback SuperLink, sending the operator
    secret that lies beside its loopback CA (``fedtune.deploy.superlink``)."""
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr CLI")]
    secret = None if ca_cert is None else operator_secret_beside(ca_cert)
    if secret is not None:
        interceptors.append(_OperatorHeader(secret))
    return ControlHttpClient.from_server_address(
        server_address=address, insecure=ca_cert is None, root_certificates=ca_cert,
        interceptors=interceptors)


class _OperatorHeader:
    """Adds the operator secret to every request (a flwr protobuf-client interceptor)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def intercept(self, context: Any, call_next: Any) -> Any:
        context.request.headers[OPERATOR_HEADER] = self.secret
        return call_next(context)


#: how long a Control API call is retried through transient failures (an HTTP 5xx, a
#: refused or dropped connection) before the server gives up: the SuperLink's SQLite
#: answers "database is locked" with a 500 while a large upload is written
TRANSIENT_WINDOW = 120.0
RETRY_FIRST, RETRY_MOST = 0.2, 5.0


def is_transient(err: BaseException) -> bool:
    """A failure worth retrying: the SuperLink answered 5xx (or 429), or the connection
    failed or timed out. A 4xx answer is a refusal and is final."""
    import httpx

    if isinstance(err, httpx.HTTPStatusError):
        code = err.response.status_code
        return code >= 500 or code == 429
    return isinstance(err, httpx.TransportError)


def _never_sent(err: BaseException) -> bool:
    """The request did not reach the SuperLink (safe to resend a non-idempotent one)."""
    import httpx

    return isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout))


class ControlSession:
    """One Control API connection (one HTTP client, kept alive) for a server's whole
    run, whose reads retry through transient failures for ``window`` seconds.
    ``between()`` runs between attempts (the server checks its SuperLink is alive)."""

    def __init__(self, address: str, ca_cert: str | None = None,
                 window: float = TRANSIENT_WINDOW, sleep: Any = time.sleep) -> None:
        self.client = _client(address, ca_cert)
        self.window, self.sleep = window, sleep

    def close(self) -> None:
        self.client.close()

    def call(self, method: str, request: Any, between: Any = None,
             retry: Any = is_transient) -> Any:
        """``client.<method>(request)``, retried while ``retry(err)`` says transient."""
        deadline = time.monotonic() + self.window
        pause = RETRY_FIRST
        while True:
            try:
                return getattr(self.client, method)(request)
            except Exception as err:  # noqa: BLE001 - Flower raises httpx's errors
                if not retry(err) or time.monotonic() + pause > deadline:
                    raise ControlError(f"{method} failed: {_describe(err)}") from None
            if between is not None:
                between()
            self.sleep(pause)
            pause = min(RETRY_MOST, pause * 2)

    def submit_run(self, app_dir: Path, config: dict[str, Any]) -> int:
        """Start a run of the Flower app in ``app_dir`` (resent only when the request
        never left: a resent StartRun that had arrived would start a second run)."""
        fab_bytes = build_fab_from_disk(Path(app_dir).resolve())
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        response = self.call("StartRun", StartRunRequest(
            fab=fab_to_proto(fab), override_config=user_config_to_proto(config),
            federation=""), retry=_never_sent)
        return int(response.run_id)

    def run_status(self, run_id: int, between: Any = None) -> tuple[str, str, str]:
        run = self.call("ListRuns", ListRunsRequest(run_id=run_id), between).run_dict[run_id]
        return run.status.status, run.status.sub_status, run.status.details

    def wait_for_run(self, run_id: int, poll: float = 1.0, on_poll: Any = None
                     ) -> tuple[str, str, str]:
        """Block until the run is finished; ``on_poll()`` runs between polls (and
        between the retries of a failed one)."""
        while True:
            status = self.run_status(run_id, on_poll)
            if status[0] == "finished":
                return status
            if on_poll is not None:
                on_poll()
            self.sleep(poll)

    def stop_run(self, run_id: int) -> None:
        self.call("StopRun", StopRunRequest(run_id=run_id))

    def register_node_keys(self, keys_file: Path) -> list[int]:
        """Register every OpenSSH public key in ``keys_file`` (one per line) as a client
        allowed to join; a key registered before (a resumed server) is skipped."""
        keys = read_key_lines(keys_file)
        if not keys:
            raise ControlError(f"server.auth_keys = {str(keys_file)!r} lists no public key")
        parsed = [parse_public_key(line, f"{keys_file}: key {n}")
                  for n, line in enumerate(keys, start=1)]
        found = [register_key(self.client, key, f"key {n} of {keys_file}")
                 for n, key in enumerate(parsed, start=1)]
        return [n for n in found if n is not None]


def _describe(err: BaseException) -> str:
    import httpx

    if isinstance(err, httpx.HTTPStatusError):
        body = err.response.text[:200].strip()
        return f"HTTP {err.response.status_code}" + (f": {body}" if body else "")
    return f"{type(err).__name__}: {err}"


@contextlib.contextmanager
def _session(address: str, ca_cert: str | None) -> Iterator[ControlSession]:
    session = ControlSession(address, ca_cert)
    try:
        yield session
    finally:
        session.close()


def submit_run(address: str, app_dir: Path, config: dict[str, Any],
               ca_cert: str | None = None) -> int:
    """Start a run of the Flower app in ``app_dir`` with ``config`` as its run config."""
    with _session(address, ca_cert) as session:
        return session.submit_run(app_dir, config)


def run_status(address: str, run_id: int, ca_cert: str | None = None) -> tuple[str, str, str]:
    """(status, sub-status, details): ``finished`` + ``completed`` | ``failed`` | ``stopped``."""
    with _session(address, ca_cert) as session:
        return session.run_status(run_id)


def stop_run(address: str, run_id: int, ca_cert: str | None = None) -> None:
    with _session(address, ca_cert) as session:
        session.stop_run(run_id)


def wait_for_run(address: str, run_id: int, ca_cert: str | None = None, poll: float = 1.0,
                 on_poll: Any = None) -> tuple[str, str, str]:
    """Block until the run is finished; ``on_poll()`` is called between polls."""
    with _session(address, ca_cert) as session:
        return session.wait_for_run(run_id, poll, on_poll)


def parse_public_key(line: str, origin: str) -> bytes:
    """An OpenSSH public key line as the bytes Flower's node registry stores."""
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    try:
        key = serialization.load_ssh_public_key(line.strip().encode())
    except (ValueError, TypeError) as err:
        raise ControlError(f"{origin} is not an OpenSSH public key: {err}") from None
    return public_key_to_bytes(key)  # type: ignore[arg-type]


def read_key_lines(keys_file: Path) -> list[str]:
    lines = [line.strip() for line in Path(keys_file).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def register_key(client: Any, public_key: bytes, origin: str) -> int | None:
    """Register one key; None when it was registered before (a resumed server)."""
    try:
        return int(client.RegisterNode(RegisterNodeRequest(public_key=public_key)).node_id)
    except Exception as err:  # noqa: BLE001 - Flower raises its own HTTP errors
        # flwr 1.41 answers 412 with "Public key already in use." in the body
        body = getattr(getattr(err, "response", None), "text", "")
        if "already" in f"{err} {body}".lower():
            return None
        raise ControlError(f"registering {origin} failed: {err}") from None


def register_node_keys(address: str, keys_file: Path, ca_cert: str | None) -> list[int]:
    """Register every OpenSSH public key in ``keys_file`` (one per line) as a client
    allowed to join; a key registered before (a resumed server) is skipped."""
    with _session(address, ca_cert) as session:
        return session.register_node_keys(keys_file)


@dataclass(frozen=True)
class NodeKey:
    """A client key the SuperLink knows: its node id, status and OpenSSH public key."""

    node_id: int
    status: str
    public_key: str


def list_node_keys(address: str, ca_cert: str | None) -> list[NodeKey]:
    """The keys that may join now (Flower keeps removed ones, marked unregistered)."""
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    client = _client(address, ca_cert)
    try:
        nodes = client.ListNodes(ListNodesRequest()).nodes_info
    finally:
        client.close()
    found = []
    for node in nodes:
        if node.status == "unregistered":
            continue
        try:
            key = bytes_to_public_key(node.public_key).public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        except ValueError:
            key = node.public_key.hex()
        found.append(NodeKey(int(node.node_id), node.status, key))
    return found


def unregister_node(address: str, node_id: int, ca_cert: str | None) -> None:
    client = _client(address, ca_cert)
    try:
        client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
    except Exception as err:  # noqa: BLE001 - Flower raises its own HTTP errors
        raise ControlError(f"removing node {node_id} failed: {err}") from None
    finally:
        client.close()


def add_keys_file(address: str, keys_file: Path, ca_cert: str | None) -> list[int]:
    """``fedtune keys add``: register the keys of a file while the server runs."""
    if not Path(keys_file).is_file():
        raise ControlError(f"{keys_file}: no such file")
    return register_node_keys(address, keys_file, ca_cert)


def remove_keys(address: str, which: str, ca_cert: str | None) -> list[int]:
    """``fedtune keys remove``: a node id, or every node holding a key of a file."""
    if which.isdigit():
        ids = [int(which)]
    else:
        if not Path(which).is_file():
            raise ControlError(f"{which}: neither a node id nor a public key file")
        wanted = {" ".join(line.split()[:2]) for line in read_key_lines(Path(which))}
        ids = [n.node_id for n in list_node_keys(address, ca_cert)
               if " ".join(n.public_key.split()[:2]) in wanted]
        if not ids:
            raise ControlError(f"no registered node holds a key of {which}")
    for node_id in ids:
        unregister_node(address, node_id, ca_cert)
    return ids
