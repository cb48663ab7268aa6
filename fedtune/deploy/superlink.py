"""The SuperLink as ``fedtune server`` starts it: flwr's own, behind an operator guard.

flwr 1.41's open-source Control API accepts every caller (its authentication plugin is a
no-op), and the SuperLink serves it on the same loopback port as the runtime API its
ServerApp needs, so any local user could start a run (whose ServerApp ran as the server's
user) or register a client key. ``python -m fedtune.deploy.superlink`` runs flwr's
SuperLink unchanged (``flower-superlink``'s own argument parser, FastAPI app and uvicorn
settings) inside one ASGI guard: a request for anything but the Fleet routes, the
runtime routes and ``/health`` must carry the per-start operator secret
(``OPERATOR_HEADER``), read from a file only the server's user can read. The runtime
routes keep flwr's own checks: ``AcquireTask`` needs the SuperExec HMAC
(``--superexec-auth-secret-file``, SuperLink in ``--isolation process``), every other
route the task token that only ``AcquireTask`` hands out.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

log = logging.getLogger("fedtune")

#: the header carrying the operator secret on the loopback SuperLink
OPERATOR_HEADER = "fedtune-operator"
#: the file holding it, beside the loopback CA certificate (``fedtune server`` makes
#: both at each start, in a folder only the server's user can read)
OPERATOR_SECRET = "operator.secret"
#: paths served without it: what SuperNodes (through the front) and the ServerApp call
OPEN_PREFIXES = ("/v1/fleet/", "/v1/runtime/")
OPEN_PATHS = frozenset({"/health"})

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


def new_secret_file(path: Path) -> str:
    """A fresh random secret in ``path``, readable by this user only; returns it."""
    secret = secrets.token_hex(32)
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_text(secret)
    return secret


def operator_secret_beside(ca_cert: str | Path) -> str | None:
    """The operator secret of the SuperLink whose loopback CA is ``ca_cert`` (None when
    that CA is not a loopback one: no secret lies beside it)."""
    path = Path(ca_cert).with_name(OPERATOR_SECRET)
    if not path.exists():
        return None
    try:
        return path.read_text().strip()
    except OSError as err:
        raise PermissionError(f"cannot read the operator secret {path} ({err.strerror}): "
                              "run this as the user running fedtune server") from None


def is_open(path: str) -> bool:
    """Whether ``path`` is served without the operator secret (no dot segments, so no
    ``/v1/fleet/../control/...``)."""
    if ".." in path or "%" in path:
        return False
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class OperatorGuard:
    """ASGI middleware: 403 for a non-open path without the operator secret."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app, self.secret = app, secret.encode()

    def allows(self, scope: Scope) -> bool:
        if is_open(scope.get("path", "")):
            return True
        given = [v for k, v in scope.get("headers", []) if k == OPERATOR_HEADER.encode()]
        return len(given) == 1 and hmac.compare_digest(given[0], self.secret)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.allows(scope):
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        log.warning("loopback SuperLink: refused %s %s from %s:%s (no operator secret)",
                    scope.get("method"), scope.get("path", "")[:200], *client)
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body",
                    "body": b"operator only: this SuperLink serves its own server\n"})


#: flwr's per-message Fleet lines ("Push replies from node_id=...", pulls, receipts):
#: which node answered when, i.e. under client-level DP which clients each round sampled
#: (a secret); the run's own records say how many
PER_MESSAGE_LINES = ("[Fleet.PushMessages]", "[Fleet.PullMessages]", "[Fleet.PushObject]",
                     "[Fleet.PullObject]", "[Fleet.ConfirmMessageReceived]",
                     "[Fleet.SendNodeHeartbeat]")


class PerMessageFilter(logging.Filter):
    """Keeps flwr's per-message Fleet lines out of the SuperLink's log (``superlink.log``
    in the run directory), whatever the level: they would name the sampled cohort."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(PER_MESSAGE_LINES)


def forget_messages(database: str | Path) -> None:
    """Rewrite the SuperLink's database with only what it still holds (the nodes and
    their keys, which a resumed server needs): a message's row, with its destination
    node and round, stays in the write-ahead log and in freed pages after Flower deletes
    it, so the run directory would tell, byte by byte, which node got which message.
    Called when the SuperLink has stopped; a database already gone is left alone."""
    import sqlite3

    path = Path(database)
    if not path.is_file():
        return
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("VACUUM")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> None:
    """``--operator-secret-file PATH`` then ``flower-superlink``'s own arguments."""
    parser = argparse.ArgumentParser(prog="python -m fedtune.deploy.superlink")
    parser.add_argument("--operator-secret-file", required=True)
    args, flower_args = parser.parse_known_args(argv)
    secret = Path(args.operator_secret_file).read_text().strip()
    if not secret:
        raise SystemExit(f"{args.operator_secret_file} is empty")
    sys.argv = ["flower-superlink", *flower_args]
    import uvicorn
    from flwr.common.logger import FLOWER_LOGGER, console_handler
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    FLOWER_LOGGER.addFilter(PerMessageFilter())
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s fedtune: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    config = _parse_superlink_lifespan_config()
    app = create_app(config, SuperLinkLifespan)
    # uvicorn re-raises the SIGTERM it stopped for once it is done: with Python's default
    # handler the process would end there, before the database is cleaned
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        # as flwr's _run_superlink_http_api, with the guard around the app
        uvicorn.run(app=OperatorGuard(app, secret), host=config.host, port=config.port,
                    reload=False, access_log=True,
                    log_config=get_uvicorn_log_config(console_handler.level),
                    ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
                    workers=1)
    finally:
        forget_messages(config.database)  # (an in-memory database is no file)


def _exit_on_signal(number: int, frame: Any) -> None:
    raise SystemExit(128 + number)


if __name__ == "__main__":
    main()
