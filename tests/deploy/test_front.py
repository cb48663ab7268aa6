"""The clients' port forwards Flower's Fleet routes and /health, bodies and headers
unchanged, and nothing else: a recording upstream (a real HTTP server on loopback)
shows what reached it."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fedtune.deploy.front import FLEET_ROUTES, MAX_BODY_BYTES, Front, Upstream, make_app
from tests.deploy import harness as h


class Recorder:
    """An upstream that answers every request with what it received, and keeps a list."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

        async def echo(request: Request) -> JSONResponse:
            body = await request.body()
            self.seen.append((request.method, request.url.path))
            return JSONResponse({"path": request.url.path, "bytes": len(body),
                                 "signature": request.headers.get("x-signature", "")},
                                status_code=200, headers={"x-upstream": "yes"})

        app = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])
        self.port = h.free_port()
        self.server = Front(f"127.0.0.1:{self.port}", app)  # the same uvicorn runner


@pytest.fixture(scope="module")
def served():
    upstream = Recorder()
    upstream.server.start()
    port = h.free_port()
    front = Front(f"127.0.0.1:{port}", make_app(Upstream(f"127.0.0.1:{upstream.port}")))
    front.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    yield client, upstream
    client.close()
    front.stop()
    upstream.server.stop()


def test_every_fleet_route_is_forwarded_with_its_body_and_headers(served):
    client, upstream = served
    for route in sorted(FLEET_ROUTES):
        reply = client.post(route, content=b"x" * 1000, headers={"x-signature": "sig"})
        assert reply.status_code == 200, route
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
