"""Talking to a SuperLink's Control API from Python: submit a run, watch it, register
client keys. Flower's CLI does the same through these (internal, hence flwr is pinned)
helpers; calling them directly saves a ``flwr`` process and a config file per call.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
from pathlib import Path
from typing import Any

from flwr.cli.build import build_fab_from_disk
from flwr.cli.typing import SuperLinkConnection
from flwr.cli.utils import init_http_client_from_connection
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
)
from flwr.supercore.fab import Fab


class ControlError(RuntimeError):
    """The SuperLink refused or failed a request."""


def _client(address: str, ca_cert: str | None) -> Any:
    connection = SuperLinkConnection(name="fedtune", address=address,
                                     root_certificates=ca_cert or None,
                                     insecure=ca_cert is None)
    with contextlib.redirect_stdout(io.StringIO()):  # Flower's CLI says "Using SuperLink"
        return init_http_client_from_connection(connection)


def submit_run(address: str, app_dir: Path, config: dict[str, Any],
               ca_cert: str | None = None) -> int:
    """Start a run of the Flower app in ``app_dir`` with ``config`` as its run config."""
    fab_bytes = build_fab_from_disk(Path(app_dir).resolve())
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    client = _client(address, ca_cert)
    try:
        response = client.StartRun(StartRunRequest(
            fab=fab_to_proto(fab), override_config=user_config_to_proto(config), federation=""))
    finally:
        client.close()
    return int(response.run_id)


def run_status(address: str, run_id: int, ca_cert: str | None = None) -> tuple[str, str, str]:
    """(status, sub-status, details): ``finished`` + ``completed`` | ``failed`` | ``stopped``."""
    client = _client(address, ca_cert)
    try:
        run = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
    finally:
        client.close()
    return run.status.status, run.status.sub_status, run.status.details


def stop_run(address: str, run_id: int, ca_cert: str | None = None) -> None:
    client = _client(address, ca_cert)
    try:
        client.StopRun(StopRunRequest(run_id=run_id))
    finally:
        client.close()


def wait_for_run(address: str, run_id: int, ca_cert: str | None = None, poll: float = 1.0,
                 on_poll: Any = None) -> tuple[str, str, str]:
    """Block until the run is finished; ``on_poll()`` is called between polls."""
    while True:
        status = run_status(address, run_id, ca_cert)
        if status[0] == "finished":
            return status
        if on_poll is not None:
            on_poll()
        time.sleep(poll)


def register_node_keys(address: str, keys_file: Path, ca_cert: str | None) -> list[int]:
    """Register every OpenSSH public key in ``keys_file`` (one per line) as a client
    allowed to join; a key registered before (a resumed server) is skipped."""
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    lines = [line.strip() for line in Path(keys_file).read_text().splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise ControlError(f"server.auth_keys = {str(keys_file)!r} lists no public key")
    node_ids = []
    client = _client(address, ca_cert)
    try:
        for number, line in enumerate(keys, start=1):
            try:
                key = serialization.load_ssh_public_key(line.encode())
            except ValueError as err:
                raise ControlError(f"{keys_file}: key {number} is not an OpenSSH public key: "
                                   f"{err}") from None
            try:
                response = client.RegisterNode(RegisterNodeRequest(
                    public_key=public_key_to_bytes(key)))
            except Exception as err:  # noqa: BLE001 - Flower raises its own HTTP errors
                if "already" in str(err).lower():
                    continue
                raise ControlError(f"registering key {number} of {keys_file} failed: "
                                   f"{err}") from None
            node_ids.append(int(response.node_id))
    finally:
        client.close()
    return node_ids
