"""The clients' port forwards Flower's Fleet routes and /health, bodies and headers
unchanged, and nothing else, and whoever reaches it holds a bounded share of it: a
recording upstream (a real HTTP server on loopback) shows what reached it, raw sockets
play the slow and idle attackers, and a real Flower key signs (or fails to sign) the
node-authentication headers."""

from __future__ import annotations

import base64
import datetime
import socket
import ssl
import time
from dataclasses import replace

import httpx
import pytest
from flwr.proto.fleet_pb2 import PushMessagesRequest, PushMessagesResponse
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.primitives.asymmetric import (
    generate_key_pairs,
    public_key_to_bytes,
    sign_message,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fedtune.deploy.admission import (
    MessageBudget,
    NodeAuth,
    ReplyBudget,
    leading_node_id,
    node_key,
)
from fedtune.deploy.front import (
    FLEET_ROUTES,
    MAX_BODY_BYTES,
    Front,
    Limits,
    Upstream,
    make_app,
    raise_fd_limit,
)
from tests.deploy import harness as h


class Recorder:
    """An upstream that answers every request with what it received, and keeps a list."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.started: list[str] = []  # requests that reached it, read whole or not

        async def echo(request: Request) -> Response:
            self.started.append(request.url.path)
            body = await request.body()
            self.seen.append((request.method, request.url.path))
            if request.url.path == "/v1/fleet/push-messages":  # accepted: push the objects
                return Response(PushMessagesResponse(objects_to_push=["x"]).SerializeToString())
            return JSONResponse({"path": request.url.path, "bytes": len(body),
                                 "signature": request.headers.get("x-signature", "")},
                                status_code=200, headers={"x-upstream": "yes"})

        app = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])
        self.port = h.free_port()
        self.server = Front(f"127.0.0.1:{self.port}", app)  # the same uvicorn runner


@pytest.fixture(scope="module")
def upstream():
    recorder = Recorder()
    recorder.server.start()
    yield recorder
    recorder.server.stop()


@pytest.fixture(scope="module")
def served(upstream):
    port = h.free_port()
    front = Front(f"127.0.0.1:{port}", make_app(Upstream(f"127.0.0.1:{upstream.port}")))
    front.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    yield client, upstream
    client.close()
    front.stop()


def test_every_fleet_route_is_forwarded_with_its_body_and_headers(served):
    client, upstream = served
    for route in sorted(FLEET_ROUTES):
        reply = client.post(route, content=b"x" * 1000, headers={"x-signature": "sig"})
        assert reply.status_code == 200, route
        if route == "/v1/fleet/push-messages":  # read whole by the front, answered as is
            assert PushMessagesResponse.FromString(reply.content).objects_to_push == ["x"]
            continue
        assert reply.json() == {"path": route, "bytes": 1000, "signature": "sig"}
        assert reply.headers["x-upstream"] == "yes"
    assert client.get("/health").status_code == 200
    assert len(upstream.seen) == len(FLEET_ROUTES) + 1


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/list-runs"), ("POST", "/v1/runtime/pull-app-inputs"),
    ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/fleet/pull-messages"),
    ("POST", "/v1/fleet/pull-messages/extra"), ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ("POST", "/health"),
])
def test_anything_else_is_refused_and_never_reaches_the_superlink(served, method, path):
    client, upstream = served
    before = len(upstream.seen)
    assert client.request(method, path).status_code == 404
    assert len(upstream.seen) == before


def test_a_body_past_the_limit_is_refused_whether_declared_or_streamed(served):
    client, upstream = served
    before = len(upstream.seen)
    big = b"x" * (MAX_BODY_BYTES + 1)
    assert client.post("/v1/fleet/push-object", content=big).status_code == 413

    def chunks():
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b"x" * (1 << 20)

    assert client.post("/v1/fleet/push-object", content=chunks()).status_code == 413
    assert len(upstream.seen) == before


# ------------------------------------------------------------------ limits of the port
#: small limits, so that a test reaches them with a few sockets and in seconds
SMALL = Limits(max_connections=40, max_per_peer=8, overflow=4, accept_rate=1000,
               accept_burst=1000, header_timeout=1.0,
               handshake_timeout=1.0, body_idle_timeout=1.0, body_grace=1.0,
               body_min_rate=64 << 10)


@pytest.fixture
def small_front(upstream):
    port = h.free_port()
    front = Front(f"127.0.0.1:{port}", make_app(Upstream(f"127.0.0.1:{upstream.port}")),
                  limits=SMALL)
    front.start()
    yield port, front
    front.stop()


def _raw(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    return sock


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` (EOF) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_the_soft_fd_limit_is_raised_and_the_caps_fit_under_it():
    import resource

    soft = raise_fd_limit()
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[1] or soft >= 1 << 20
    fitted = Limits(max_connections=10**6, max_per_peer=10**6).within_fd_limit(1024)
    assert fitted.max_connections + fitted.overflow + fitted.fd_reserve \
        + fitted.upstream_connections <= 1024
    assert fitted.max_per_peer <= fitted.max_connections
    with pytest.raises(OSError, match="file-descriptor limit"):
        Limits().within_fd_limit(200)


def test_half_a_request_line_is_closed_after_the_header_deadline(small_front):
    port, _ = small_front
    idle = _raw(port)
    idle.sendall(b"POST /v1/fleet/pull-mess")
    started = time.monotonic()
    assert _closed_by_server(idle, 10)
    assert time.monotonic() - started < SMALL.header_timeout + 3
    idle.close()


def test_a_keep_alive_connection_that_goes_quiet_is_closed_too(small_front):
    port, _ = small_front
    sock = _raw(port)
    sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    sock.settimeout(10)
    assert b"200" in sock.recv(4096).split(b"\r\n")[0]
    sock.sendall(b"GET /hea")  # the next request never completes
    assert _closed_by_server(sock, SMALL.header_timeout + 3)
    sock.close()


def test_a_body_that_trickles_is_cut_off_at_its_deadline(small_front, upstream):
    port, _ = small_front
    before = len(upstream.seen)
    sock = _raw(port)
    sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nhost: x\r\n"
                 b"content-length: 100000\r\n\r\n")
    started = time.monotonic()
    answer = b""
    sock.settimeout(0.5)
    while time.monotonic() - started < 15:
        try:
            sock.sendall(b"x")
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    sock.close()
    # deadline: grace + 100 kB at 64 kB/s = 2.5 s; every 0.5 s is a byte (no idle gap)
    assert time.monotonic() - started < 10
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert len(upstream.seen) == before or upstream.seen[-1][1] != "/v1/fleet/pull-messages"


def test_past_the_per_peer_cap_a_quick_503_then_closed_and_others_are_still_served(
        small_front):
    port, _ = small_front
    held = [_raw(port, "127.0.0.2") for _ in range(SMALL.max_per_peer)]
    time.sleep(0.3)  # accepted and counted
    extra = [_raw(port, "127.0.0.2") for _ in range(SMALL.overflow)]
    for sock in extra:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    for sock in extra:
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 503")
    beyond = _raw(port, "127.0.0.2")
    assert _closed_by_server(beyond, 5)  # past the overflow too: closed at once
    # another peer is served meanwhile, and quickly
    started = time.monotonic()
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 2
    for sock in [*held, *extra, beyond]:
        sock.close()


def test_past_the_total_cap_new_connections_get_503_and_the_front_recovers(small_front):
    port, _ = small_front
    held = [_raw(port, f"127.0.0.{3 + i // SMALL.max_per_peer}")
            for i in range(SMALL.max_connections)]
    time.sleep(0.3)
    reply = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert reply.status_code == 503
    for sock in held:
        sock.close()
    time.sleep(0.3)
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200


def test_a_stalled_tls_handshake_is_closed(upstream, tmp_path):
    from fedtune.deploy.certs import make_certificates

    made = make_certificates(tmp_path, ["127.0.0.1"])
    port = h.free_port()
    front = Front(f"127.0.0.1:{port}", make_app(Upstream(f"127.0.0.1:{upstream.port}")),
                  certfile=str(made.cert), keyfile=str(made.key), limits=SMALL)
    front.start()
    try:
        silent = _raw(port)  # TCP only: not one byte of the handshake
        assert _closed_by_server(silent, SMALL.handshake_timeout + 3)
        context = ssl.create_default_context(cafile=str(made.ca_cert))
        with httpx.Client(verify=context, timeout=5) as client:
            assert client.get(f"https://127.0.0.1:{port}/health").status_code == 200
    finally:
        front.stop()


# ------------------------------------------------------------------ node authentication
def _signed(private_key, public_key, timestamp: datetime.datetime | None = None) -> dict:
    stamp = (timestamp or datetime.datetime.now(datetime.UTC)).isoformat()
    return {"flwr-public-key": base64.b64encode(public_key_to_bytes(public_key)).decode(),
            "flwr-timestamp": stamp,
            "flwr-signature": base64.b64encode(sign_message(private_key,
                                                            stamp.encode())).decode()}


@pytest.fixture
def authenticated(upstream):
    """A front that knows one key at first; the second is 'registered' later (as
    ``fedtune keys add`` does while the server runs)."""
    member, later = generate_key_pairs(), generate_key_pairs()
    registered = {public_key_to_bytes(member[1])}
    auth = NodeAuth(lambda: set(registered))
    port = h.free_port()
    front = Front(f"127.0.0.1:{port}", make_app(Upstream(f"127.0.0.1:{upstream.port}"), auth),
                  limits=SMALL)
    front.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    yield client, member, later, registered
    client.close()
    front.stop()


def test_only_a_registered_key_with_a_fresh_signature_reaches_the_superlink(
        authenticated, upstream):
    client, (private, public), (later_private, later_public), registered = authenticated
    other_private, _ = generate_key_pairs()
    before = len(upstream.seen)
    route = "/v1/fleet/pull-messages"
    assert client.post(route, content=b"x").status_code == 401  # no headers
    forged = {**_signed(private, public), "flwr-signature": base64.b64encode(
        sign_message(other_private, b"another text")).decode()}
    assert client.post(route, content=b"x", headers=forged).status_code == 401
    old = _signed(private, public, datetime.datetime.now(datetime.UTC)
                  - datetime.timedelta(minutes=10))
    assert client.post(route, content=b"x", headers=old).status_code == 401
    assert client.post(route, content=b"x",
                       headers=_signed(later_private, later_public)).status_code == 401
    assert len(upstream.seen) == before  # none of these reached the SuperLink
    assert client.post(route, content=b"x", headers=_signed(private, public)).status_code == 200
    registered.add(public_key_to_bytes(later_public))  # the operator adds a key
    time.sleep(2.1)  # the front asks the SuperLink again at most every 2 s
    assert client.post(route, content=b"x",
                       headers=_signed(later_private, later_public)).status_code == 200
    assert client.get("/health").status_code == 200  # the probe needs no key


def test_an_outsiders_large_upload_is_refused_before_its_body_is_read(authenticated, upstream):
    client, *_ = authenticated
    before = len(upstream.seen)
    port = int(str(client.base_url).rsplit(":", 1)[1].strip("/"))
    sock = _raw(port)
    sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\n"
                 b"content-length: 67108863\r\n\r\n" + b"x" * 65536)
    sock.settimeout(5)
    assert sock.recv(4096).startswith(b"HTTP/1.1 401")
    assert _closed_by_server(sock, 5)
    sock.close()
    assert len(upstream.seen) == before


def test_the_routes_used_before_a_node_is_known_take_tiny_bodies(served):
    client, upstream = served
    before = len(upstream.seen)
    assert client.post("/v1/fleet/activate-node", content=b"x" * 20000).status_code == 413
    assert client.post("/v1/fleet/register-node", content=b"x" * 20000).status_code == 413
    assert client.post("/v1/fleet/pull-messages", content=b"x" * (2 << 20)).status_code == 413
    assert len(upstream.seen) == before


# ------------------------------------------------------------------ message budget
def test_a_node_id_is_read_from_the_first_bytes_of_a_push():
    push = PushObjectRequest(node=Node(node_id=1234567890123), run_id=5, object_id="a" * 64,
                             object_content=b"z" * 1000).SerializeToString()
    assert leading_node_id(push[:40]) == 1234567890123
    messages = PushMessagesRequest(node=Node(node_id=77)).SerializeToString()
    assert leading_node_id(messages) == 77
    assert leading_node_id(b"") is None
    assert leading_node_id(b"\x12\x03abc") is None
    assert node_key(b"key", "1.2.3.4", push) == b"key"
    assert node_key(None, "1.2.3.4", push) == "1.2.3.4/node 1234567890123"


def test_each_node_pushes_at_most_its_budget_per_message(upstream):
    budget = MessageBudget(ReplyBudget(10_000, "a test budget"))
    port = h.free_port()
    front = Front(f"127.0.0.1:{port}",
                  make_app(Upstream(f"127.0.0.1:{upstream.port}"), budget=budget),
                  limits=SMALL)
    front.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def push(node: int, size: int, streamed: bool = False) -> int:
        body = PushObjectRequest(node=Node(node_id=node), object_id="o",
                                 object_content=b"z" * size).SerializeToString()
        content = iter([body[i:i + 1000] for i in range(0, len(body), 1000)]) if streamed \
            else body
        return client.post("/v1/fleet/push-object", content=content).status_code

    def new_message(node: int) -> int:
        return client.post("/v1/fleet/push-messages", content=PushMessagesRequest(
            node=Node(node_id=node)).SerializeToString()).status_code

    try:
        before, started = len(upstream.seen), len(upstream.started)
        assert new_message(1) == 200
        assert [push(1, 4000), push(1, 4000)] == [200, 200]
        assert push(1, 4000) == 413  # declared: refused before a byte is read
        assert push(1, 4000, streamed=True) == 413  # chunked: cut off as it passes
        assert push(2, 4000) == 200  # another node has its own budget
        assert new_message(1) == 200  # the next reply of node 1: a fresh budget
        assert push(1, 4000) == 200
        forwarded = [p for _, p in upstream.seen[before:]]
        assert forwarded.count("/v1/fleet/push-object") == 4
        # the declared one never reached the SuperLink; the streamed one was cut off there
        assert upstream.started[started:].count("/v1/fleet/push-object") == 5
    finally:
        client.close()
        front.stop()


def test_keys_are_looked_up_once_for_a_burst_and_a_failed_lookup_is_a_503_not_a_401(upstream):
    """A SuperNode refused with 401 stops for good: the first requests of several
    nodes, arriving during one slow key listing, must all wait for it; while the
    SuperLink cannot list its keys, an unknown key gets a retryable 503."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = [generate_key_pairs() for _ in range(4)]
    calls = []
    failing = []

    def registered():
        calls.append(time.monotonic())
        if failing:
            raise RuntimeError("database is locked")
        time.sleep(0.5)
        return {public_key_to_bytes(public) for _, public in pairs}

    port = h.free_port()
    front = Front(f"127.0.0.1:{port}",
                  make_app(Upstream(f"127.0.0.1:{upstream.port}"), NodeAuth(registered)),
                  limits=SMALL)
    front.start()
    url = f"http://127.0.0.1:{port}/v1/fleet/activate-node"
    try:
        with ThreadPoolExecutor(len(pairs)) as pool:
            codes = list(pool.map(lambda pair: httpx.post(
                url, content=b"x", headers=_signed(*pair), timeout=10).status_code, pairs))
        assert codes == [200] * len(pairs)
        assert len(calls) == 1
        failing.append(True)
        time.sleep(2.1)
        stranger = generate_key_pairs()
        assert httpx.post(url, content=b"x", headers=_signed(*stranger),
                          timeout=10).status_code == 503
    finally:
        front.stop()


def test_an_address_that_opens_connections_too_fast_is_closed_at_the_accept(upstream):
    limits = replace(SMALL, accept_rate=2.0, accept_burst=5, header_timeout=30.0)
    port = h.free_port()
    front = Front(f"127.0.0.1:{port}", make_app(Upstream(f"127.0.0.1:{upstream.port}")),
                  limits=limits)
    front.start()
    try:
        opened = [_raw(port, "127.0.0.5") for _ in range(8)]
        # the sixth on is closed at once; none held a slot (all within the per-peer cap)
        closed = [_closed_by_server(sock, 0.5) for sock in opened]
        assert closed == [False] * 5 + [True] * 3
        for sock in opened:
            sock.close()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        time.sleep(limits.accept_burst / limits.accept_rate + 0.5)  # the bucket is full
        drained = [_raw(port, "127.0.0.5") for _ in range(5)]
        time.sleep(1.1)  # two more tokens
        again = [_raw(port, "127.0.0.5") for _ in range(3)]
        assert [_closed_by_server(sock, 0.3) for sock in again] == [False, False, True]
        for sock in [*drained, *again]:
            sock.close()
    finally:
        front.stop()
