"""The clients' port: a front that serves Flower's Fleet API and nothing else.

flwr 1.41's SuperLink serves its Fleet API (what SuperNodes call), its Control API
(submit runs, register client keys) and the ServerApp's runtime API on ONE HTTP port,
and the open-source Control API accepts every caller. ``fedtune server`` therefore binds
the SuperLink to the loopback interface and puts this front on ``server.address``: it
forwards exactly the Fleet routes a SuperNode uses (and ``/health``) to the SuperLink
and answers 404 to everything else, so run submission and key registration are
reachable only from the server machine. The front terminates the clients' TLS with the
server's certificate and talks TLS again to the SuperLink (a per-run loopback
certificate), so nothing crosses even loopback in the clear. Bodies are streamed, and
headers (node authentication's signature and timestamp among them) pass unchanged: the
SuperLink still authenticates every node itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("fedtune")

#: The Fleet routes of flwr 1.41 (``flwr/superlink/routers/fleet/router.py``): all a
#: SuperNode calls. Registration through the Fleet API is refused by the SuperLink itself
#: when node authentication is on; without it, it is how a SuperNode joins.
FLEET_ROUTES = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received"))
HEALTH_ROUTE = "/health"

#: The largest request body forwarded. Flower sends arrays in chunks of 5 MB
#: (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``) and FABs of at most 10 MB, so honest requests
#: stay far below; the SuperLink itself reads a whole body before it checks who sent it.
MAX_BODY_BYTES = 64 << 20

#: hop-by-hop headers (RFC 9110 7.6.1) and those httpx / uvicorn set for themselves
_NOT_FORWARDED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                            "transfer-encoding", "upgrade", "host", "content-length"})


@dataclass(frozen=True)
class Upstream:
    """Where the SuperLink listens (loopback) and the CA of its loopback certificate
    (None: plain HTTP, an insecure deployment)."""

    address: str
    ca_cert: str | None = None

    @property
    def url(self) -> str:
        return f"{'http' if self.ca_cert is None else 'https'}://{self.address}"


def _headers(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in items if k.lower() not in _NOT_FORWARDED]


def make_app(upstream: Upstream) -> Starlette:
    """An ASGI app forwarding the Fleet routes and /health to ``upstream``."""
    verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=upstream.ca_cert)
                                     if upstream.ca_cert else False)
    client = httpx.AsyncClient(base_url=upstream.url, verify=verify, timeout=None,
                               limits=httpx.Limits(max_connections=256))

    async def forward(request: Request) -> Response:
        path = request.url.path
        allowed = ((path in FLEET_ROUTES and request.method == "POST")
                   or (path == HEALTH_ROUTE and request.method == "GET"))
        if not allowed:
            log.warning("front: refused %s %s from %s", request.method, path[:200],
                        request.client.host if request.client else "?")
            return PlainTextResponse("not served on the clients' port\n", status_code=404)
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            return _too_large(request)
        upstream_request = client.build_request(
            request.method, path, headers=_headers(request.headers.items()),
            content=_body(request))
        try:
            reply = await client.send(upstream_request, stream=True)
        except BodyTooLarge:
            return _too_large(request)
        except httpx.HTTPError as err:
            return PlainTextResponse(f"SuperLink unavailable: {type(err).__name__}\n",
                                     status_code=503)
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code,
                                 headers=dict(_headers(reply.headers.items())),
                                 background=BackgroundTask(reply.aclose))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    routes = [Route("/{path:path}", forward,
                    methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])]
    return Starlette(routes=routes, lifespan=lifespan)


class BodyTooLarge(Exception):
    """A request body past MAX_BODY_BYTES (one sent chunked, without a length)."""


def _too_large(request: Request) -> Response:
    log.warning("front: refused a body over %d bytes on %s", MAX_BODY_BYTES,
                request.url.path[:200])
    return PlainTextResponse("request body too large\n", status_code=413)


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The body as it arrives, cut off past MAX_BODY_BYTES."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > MAX_BODY_BYTES:
            raise BodyTooLarge
        yield chunk


class Front:
    """An ASGI app (``make_app``'s) served by uvicorn in a daemon thread of ``fedtune
    server``, with TLS when given a certificate."""

    def __init__(self, listen: str, app: Starlette, certfile: str | None = None,
                 keyfile: str | None = None) -> None:
        host, _, port = listen.rpartition(":")
        config = uvicorn.Config(app, host=host.strip("[]"), port=int(port),
                                ssl_certfile=certfile, ssl_keyfile=keyfile,
                                log_level="warning", access_log=False, lifespan="on",
                                timeout_keep_alive=75)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="fedtune-front", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as err:  # noqa: BLE001 - reported by start()
            self.error = err

    def start(self, timeout: float = 30.0) -> None:
        """Serve; raises OSError when the port cannot be bound (in use, not ours)."""
        self.thread.start()
        waited = 0.0
        while not self.server.started:
            if not self.thread.is_alive() or waited > timeout:
                raise OSError(f"the clients' port could not be served: "
                              f"{self.error or 'uvicorn did not start'}")
            self.thread.join(0.05)
            waited += 0.05

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
