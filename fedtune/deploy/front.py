"""The clients' port: a front that serves Flower's Fleet API and nothing else, and
degrades under load instead of dying.

flwr 1.41's SuperLink serves its Fleet API (what SuperNodes call), its Control API
(submit runs, register client keys) and the ServerApp's runtime API on ONE HTTP port,
and the open-source Control API accepts every caller. ``fedtune server`` therefore binds
the SuperLink to the loopback interface and puts this front on ``server.address``: it
forwards exactly the Fleet routes a SuperNode uses (and ``/health``) to the SuperLink
and answers 404 to everything else, so run submission and key registration are
reachable only from the server machine. The front terminates the clients' TLS with the
server's certificate and talks TLS again to the SuperLink (a per-run loopback
certificate), so nothing crosses even loopback in the clear.

Whoever can reach the port costs the server a bounded amount (:class:`Limits`): the
front accepts connections itself and counts them from the accept, before the TLS
handshake (total and per peer address, below the process's file-descriptor limit,
whose soft value it raises to the hard one); past the caps a connection gets a quick
503 (a few more) or is closed at once. A handshake, a request's headers and its body
each have a deadline (the body's grows with its declared length at a minimum rate), so
idle and slow-loris connections are closed. With node authentication, a Fleet request
whose headers do not prove a registered key is refused before its body is read
(``fedtune.deploy.admission``); the routes used before a node is known take tiny
bodies, and every route its own cap. What each node pushes for one message is counted
against the largest reply the federation's clients can produce. Requests to the
SuperLink share a bounded pool with timeouts: a stuck SuperLink gives 503s, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import h11
import httpx
import uvicorn
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedtune.deploy.admission import (
    MessageBudget,
    NodeAuth,
    Refused,
    node_key,
)

log = logging.getLogger("fedtune")

#: The Fleet routes of flwr 1.41 (``flwr/superlink/routers/fleet/router.py``): all a
#: SuperNode calls. Registration through the Fleet API is refused by the SuperLink itself
#: when node authentication is on; without it, it is how a SuperNode joins.
FLEET_ROUTES = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received"))
HEALTH_ROUTE = "/health"
PUSH_OBJECT = "/v1/fleet/push-object"
PUSH_MESSAGES = "/v1/fleet/push-messages"

#: The largest request body forwarded. Flower sends arrays in chunks of 5 MB
#: (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``) and FABs of at most 10 MB, so honest requests
#: stay far below; the SuperLink itself reads a whole body before it checks who sent it.
MAX_BODY_BYTES = 64 << 20
#: Per route: the routes used before a node is known carry a public key and a few
#: numbers; push-messages a message's metadata and object tree (object ids); the others
#: ids and small records. push-object is held to MAX_BODY_BYTES and the message budget.
ROUTE_BODY_BYTES = {"/v1/fleet/register-node": 16 << 10, "/v1/fleet/activate-node": 16 << 10,
                    PUSH_MESSAGES: 16 << 20, PUSH_OBJECT: MAX_BODY_BYTES}
OTHER_ROUTE_BODY_BYTES = 1 << 20
#: the longest push-messages reply the front reads to learn whether the SuperLink
#: accepted the message (a list of object ids and a session id)
PUSH_REPLY_BYTES = 16 << 20

#: hop-by-hop headers (RFC 9110 7.6.1) and those httpx / uvicorn set for themselves
_NOT_FORWARDED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                            "transfer-encoding", "upgrade", "host", "content-length"})


@dataclass(frozen=True)
class Limits:
    """What one peer, and everyone together, may hold of the front.

    Connections are counted from the accept (before the TLS handshake). Up to
    ``max_connections`` in all and ``max_per_peer`` per address are served; up to
    ``overflow`` more get a 503 and are closed; past those, or past its address's
    accept rate, a connection is closed at once. Timeouts are seconds."""

    max_connections: int = 1024
    max_per_peer: int = 128
    overflow: int = 64
    #: new connections per second one address may open (a token bucket of
    #: ``accept_burst``): a TLS handshake costs the front's one event loop CPU, and
    #: SuperNodes keep their connections alive, so only a flood needs more
    accept_rate: float = 8.0
    accept_burst: int = 32
    #: file descriptors kept for everything else the process opens (the pool to the
    #: SuperLink, logs, the database of the run, subprocess pipes)
    fd_reserve: int = 256
    handshake_timeout: float = 10.0
    #: from the connection (or the previous response) to a request's complete headers
    header_timeout: float = 10.0
    #: the longest wait for the next piece of a body, and the slowest rate a body may
    #: arrive at on average (its deadline: ``body_grace`` + length / ``body_min_rate``)
    body_idle_timeout: float = 15.0
    body_min_rate: float = 32 << 10
    body_grace: float = 15.0
    max_header_bytes: int = 32 << 10
    #: requests in flight to the SuperLink, and how long one waits for a free slot
    upstream_connections: int = 64
    upstream: httpx.Timeout = field(default_factory=lambda: httpx.Timeout(
        connect=5.0, read=60.0, write=60.0, pool=5.0))

    def within_fd_limit(self, soft: int) -> Limits:
        """These limits with the connection caps lowered to fit ``soft`` descriptors
        (each connection holds one, each request in flight one more upstream)."""
        room = soft - self.fd_reserve - self.upstream_connections - self.overflow
        if room < 16:
            raise OSError(f"the file-descriptor limit ({soft}) leaves no room for clients' "
                          f"connections; raise it (ulimit -n, LimitNOFILE=)")
        total = min(self.max_connections, room)
        return replace(self, max_connections=total, max_per_peer=min(self.max_per_peer, total))


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


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


class BodyTooLarge(Exception):
    """A request body past its route's cap (one sent chunked, without a length)."""


class BodyTooSlow(Exception):
    """A request body that stalled, or arrives slower than ``Limits.body_min_rate``."""


class _RefusalLog:
    """Refusals logged at most once per ``every`` seconds per status code, the latest
    with the count since the last line, so that a flood does not flood the log (a
    node's first refusal past its message budget is always logged: it names an admitted
    node)."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.last: dict[int, float] = {}
        self.pending: Counter[int] = Counter()

    def __call__(self, status: int, reason: str, always: bool = False) -> None:
        self.pending[status] += 1
        now = time.monotonic()
        if always or now - self.last.get(status, -self.every) >= self.every:
            count = self.pending.pop(status)
            self.last[status] = now
            more = f" ({count} refusals with {status} since the last line)" if count > 1 else ""
            log.warning("front: refused (%d) %s%s", status, reason, more)


class FleetFront:
    """The ASGI app: Fleet routes and /health forwarded to ``upstream``, each request
    checked (route, node authentication, body cap, message budget) before its body is
    read."""

    def __init__(self, upstream: Upstream, auth: NodeAuth | None = None,
                 budget: MessageBudget | None = None, limits: Limits | None = None) -> None:
        self.upstream = upstream
        self.auth = auth
        self.budget = budget
        self.limits = limits or Limits()
        self.refused = _RefusalLog()
        self.client: httpx.AsyncClient | None = None

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            verify: ssl.SSLContext | bool = (
                ssl.create_default_context(cafile=self.upstream.ca_cert)
                if self.upstream.ca_cert else False)
            pool = self.limits.upstream_connections
            self.client = httpx.AsyncClient(
                base_url=self.upstream.url, verify=verify, timeout=self.limits.upstream,
                limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool))
        return self.client

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, self._deadline_receive(scope, receive))
        try:
            try:
                response = await self.handle(request)
            except BodyTooLarge:
                raise Refused(413, "a streamed body over its route's cap") from None
            except BodyTooSlow:
                raise Refused(408, "a body that stalled or arrived too slowly") from None
        except Refused as refusal:
            self.refused(refusal.status, f"{refusal.reason} on {request.url.path[:80]} from "
                         f"{request.client.host if request.client else '?'}",
                         always=refusal.always_logged)
            # the connection closes after this answer: an unread body never holds it
            response = PlainTextResponse(f"{refusal.reason}\n", status_code=refusal.status,
                                         headers={"connection": "close"})
        await response(scope, receive, send)

    async def _lifespan(self, receive: Callable[[], Awaitable[dict]],
                        send: Callable[[dict], Awaitable[None]]) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _deadline_receive(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]]
                          ) -> Callable[[], Awaitable[dict]]:
        """``receive`` with the body's deadlines: each piece within body_idle_timeout,
        the whole within body_grace + declared length / body_min_rate."""
        limits = self.limits
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        length = int(declared) if declared.isdigit() else MAX_BODY_BYTES
        deadline = time.monotonic() + limits.body_grace + length / limits.body_min_rate

        async def receive_in_time() -> dict:
            left = min(limits.body_idle_timeout, deadline - time.monotonic())
            try:
                return await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except TimeoutError:
                raise BodyTooSlow from None

        return receive_in_time

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        if path == HEALTH_ROUTE and request.method == "GET":
            if request.headers.get("content-length", "0") != "0" or (
                    "transfer-encoding" in request.headers):
                raise Refused(413, "a body on /health")
            return await self._forward(request, None, None)
        if not (path in FLEET_ROUTES and request.method == "POST"):
            raise Refused(404, f"{request.method} {path[:80]}: not served on the clients' port")
        declared = request.headers.get("content-length")
        cap = ROUTE_BODY_BYTES.get(path, OTHER_ROUTE_BODY_BYTES)
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            raise Refused(413, f"a body of {declared[:20]} bytes, over {cap:,}")
        public_key = None
        if self.auth is not None:
            headers = {k.lower(): v for k, v in request.headers.items()}
            public_key = await self.auth.authenticate(headers)
        return await self._forward(request, cap, public_key)

    async def _forward(self, request: Request, cap: int | None,
                       public_key: bytes | None) -> Response:
        client = self._client()
        path = request.url.path
        body = _body(request, cap or 0)
        node = None
        if self.budget is not None and path in (PUSH_OBJECT, PUSH_MESSAGES):
            prefix = b""
            if public_key is None:  # the node id its body names: read its first bytes
                prefix, body = await _peek(body, 64)
            node = node_key(public_key, request.client.host if request.client else "?",
                            prefix)
            declared = request.headers.get("content-length")
            if path == PUSH_OBJECT and declared is not None and declared.isdigit():
                self.budget.charge(node, int(declared))  # before the SuperLink hears of it
            elif path == PUSH_OBJECT:
                body = self._charged(body, node)
        upstream_request = client.build_request(
            request.method, path, headers=_headers(request.headers.items()),
            content=body if cap is not None else None)
        try:
            reply = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as err:
            return PlainTextResponse(f"SuperLink unavailable: {type(err).__name__}\n",
                                     status_code=503)
        if path == PUSH_MESSAGES and node is not None:
            return await self._note_push(reply, node)
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code,
                                 headers=dict(_headers(reply.headers.items())),
                                 background=BackgroundTask(reply.aclose))

    async def _charged(self, body: AsyncIterator[bytes], node: object
                       ) -> AsyncIterator[bytes]:
        """A body sent without a length, each piece charged to ``node``'s message
        budget before it is forwarded."""
        assert self.budget is not None
        async for chunk in body:
            self.budget.charge(node, len(chunk))
            yield chunk

    async def _note_push(self, reply: httpx.Response, node: object) -> Response:
        """A push-messages reply, read whole: when the SuperLink accepted the message
        and asks for its objects, ``node`` starts a new message budget."""
        from flwr.proto.fleet_pb2 import PushMessagesResponse  # noqa: PLC0415

        try:
            content = b""
            async for chunk in reply.aiter_raw():
                content += chunk
                if len(content) > PUSH_REPLY_BYTES:
                    return PlainTextResponse("SuperLink reply too large\n", status_code=502)
        finally:
            await reply.aclose()
        if reply.status_code == 200:
            try:
                accepted = PushMessagesResponse.FromString(content).objects_to_push
            except Exception:  # noqa: BLE001 - not a reply to count on
                accepted = []
            if accepted:
                self.budget.new_message(node)  # type: ignore[union-attr]
        return Response(content, status_code=reply.status_code,
                        headers=dict(_headers(reply.headers.items())))


def make_app(upstream: Upstream, auth: NodeAuth | None = None,
             budget: MessageBudget | None = None, limits: Limits | None = None) -> FleetFront:
    """An ASGI app forwarding the Fleet routes and /health to ``upstream``."""
    return FleetFront(upstream, auth, budget, limits)


async def _body(request: Request, cap: int) -> AsyncIterator[bytes]:
    """The body as it arrives, cut off past ``cap`` bytes."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > cap:
            raise BodyTooLarge
        yield chunk


async def _peek(body: AsyncIterator[bytes], size: int
                ) -> tuple[bytes, AsyncIterator[bytes]]:
    """The first ``size`` bytes of ``body`` (or all, if shorter), and the whole body."""
    head: list[bytes] = []
    got = 0
    async for chunk in body:
        head.append(chunk)
        got += len(chunk)
        if got >= size:
            break
    prefix = b"".join(head)

    async def whole() -> AsyncIterator[bytes]:
        if prefix:
            yield prefix
        async for chunk in body:
            yield chunk

    return prefix[:size], whole()


class _Gate:
    """Connections held now, in all and per peer address (the event loop's thread only)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.per_peer: Counter[str] = Counter()
        self.refusing = 0
        self.buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, when)

    def admit(self, peer: str) -> str:
        """'serve', 'refuse' (a 503) or 'close' for a new connection from ``peer``."""
        limits = self.limits
        if not self._take_token(peer):
            return "close"
        if self.total < limits.max_connections and self.per_peer[peer] < limits.max_per_peer:
            self.total += 1
            self.per_peer[peer] += 1
            return "serve"
        if self.refusing < limits.overflow:
            self.refusing += 1
            return "refuse"
        return "close"

    def _take_token(self, peer: str) -> bool:
        """One new connection from ``peer`` within its accept rate."""
        limits = self.limits
        now = time.monotonic()
        tokens, since = self.buckets.get(peer, (float(limits.accept_burst), now))
        tokens = min(float(limits.accept_burst), tokens + (now - since) * limits.accept_rate)
        if len(self.buckets) > 4096:  # forget the addresses whose bucket is full again
            full = float(limits.accept_burst)
            self.buckets = {p: (t, w) for p, (t, w) in self.buckets.items()
                            if t + (now - w) * limits.accept_rate < full}
        if tokens < 1.0:
            self.buckets[peer] = (tokens, now)
            return False
        self.buckets[peer] = (tokens - 1.0, now)
        return True

    def release(self, peer: str, admitted: str) -> None:
        if admitted == "serve":
            self.total -= 1
            self.per_peer[peer] -= 1
            if not self.per_peer[peer]:
                del self.per_peer[peer]
        elif admitted == "refuse":
            self.refusing -= 1


class _GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers (uvicorn has
    none: half a request line would hold the connection forever), that reports its end
    to the gate, and answers every request with a 503 when the gate said so."""

    def __init__(self, *args: Any, header_timeout: float, refuse: bool,
                 on_lost: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.on_lost = on_lost
        self.header_timer: asyncio.TimerHandle | None = None
        if refuse:
            self.limit_concurrency = 0  # uvicorn answers 503 (connection: close)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def _await_headers(self) -> None:
        self._headers_arrived()
        self.header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _headers_arrived(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_late(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._headers_arrived()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_arrived()
        super().connection_lost(exc)
        on_lost, self.on_lost = self.on_lost, lambda: None
        on_lost()


class _Listener:
    """The listening socket and its accept loop, closable the way uvicorn closes the
    servers it made itself."""

    def __init__(self, sock: socket.socket, task: asyncio.Task[None]) -> None:
        self.sock, self.task = sock, task

    def close(self) -> None:
        self.task.cancel()
        self.sock.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class _GuardedServer(uvicorn.Server):
    """uvicorn's server with our own accept loop: each connection is counted by the
    gate from its accept, its TLS handshake has a deadline, and its protocol is
    ``_GuardedProtocol``."""

    def __init__(self, config: uvicorn.Config, limits: Limits,
                 tls: ssl.SSLContext | None) -> None:
        super().__init__(config)
        self.limits = limits
        self.tls = tls
        self.gate = _Gate(limits)
        self.handshakes: set[asyncio.Task[None]] = set()  # held until each one ends

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            self.should_exit = True
            return
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.host, self.config.port))
            sock.listen(self.config.backlog)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            log.error("front: cannot listen on %s:%s: %s", self.config.host,
                      self.config.port, err)
            await self.lifespan.shutdown()
            raise
        self.servers = [_Listener(sock, asyncio.create_task(self._accept(sock)))]  # type: ignore[list-item]
        self.started = True

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except OSError as err:  # EMFILE and friends: wait, never die
                log.warning("front: accept failed: %s", err)
                await asyncio.sleep(0.1)
                continue
            peer = str(address[0])
            admitted = self.gate.admit(peer)
            if admitted == "close":
                conn.close()
                continue
            task = loop.create_task(self._connection(conn, peer, admitted))
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)

    async def _connection(self, conn: socket.socket, peer: str, admitted: str) -> None:
        loop = asyncio.get_running_loop()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.gate.release(peer, admitted)

        def protocol() -> _GuardedProtocol:
            return _GuardedProtocol(config=self.config, server_state=self.server_state,
                                    app_state=self.lifespan.state, _loop=loop,
                                    header_timeout=self.limits.header_timeout,
                                    refuse=admitted == "refuse", on_lost=release)

        try:
            await loop.connect_accepted_socket(
                protocol, conn, ssl=self.tls,
                ssl_handshake_timeout=self.limits.handshake_timeout if self.tls else None)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            conn.close()
            release()
        except asyncio.CancelledError:
            conn.close()
            release()
            raise


class Front:
    """``make_app``'s ASGI app served in a daemon thread of ``fedtune server``, with TLS
    when given a certificate, within ``limits`` (lowered to the fd limit)."""

    def __init__(self, listen: str, app: Any, certfile: str | None = None,
                 keyfile: str | None = None, limits: Limits | None = None) -> None:
        host, _, port = listen.rpartition(":")
        self.limits = (limits or Limits()).within_fd_limit(raise_fd_limit())
        if isinstance(app, FleetFront):  # its body deadlines and upstream pool
            app.limits = self.limits
        tls = None
        if certfile:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(certfile, keyfile)
        config = uvicorn.Config(app, host=host.strip("[]"), port=int(port),
                                # uvicorn warns once per refused request ("Exceeded
                                # concurrency limit", "Invalid HTTP request"): under a
                                # flood that is the flood; ours are rate-limited
                                log_level="error", access_log=False, lifespan="on",
                                timeout_keep_alive=int(self.limits.header_timeout) or 1,
                                h11_max_incomplete_event_size=self.limits.max_header_bytes)
        self.server = _GuardedServer(config, self.limits, tls)
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
