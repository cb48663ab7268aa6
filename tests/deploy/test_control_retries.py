"""The server's Control API calls through Flower's own HTTP client, against a local
HTTP server that fails as a busy SuperLink does (HTTP 500 "database is locked", 503):
reads are retried and all go over one kept-alive connection; a
refusal (4xx) and a StartRun that may have arrived are not resent."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from flwr.proto.control_pb2 import ListRunsResponse
from flwr.proto.run_pb2 import Run, RunStatus

from fedtune.deploy.control import ControlError, ControlSession

pytestmark = pytest.mark.timeout(60)


class FlakySuperLink:
    """Answers ``/v1/control/list-runs`` with the codes in ``plan`` (then 200 and a
    finished run), recording each request's client port (one port = one connection)."""

    def __init__(self, plan: list[int]) -> None:
        self.plan, self.ports, self.paths = list(plan), [], []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the SuperLink's uvicorn

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("content-length", 0)))
                owner.ports.append(self.client_address[1])
                owner.paths.append(self.path)
                code = owner.plan.pop(0) if owner.plan else 200
                body = b"database is locked" if code != 200 else ListRunsResponse(
                    run_dict={7: Run(run_id=7, status=RunStatus(
                        status="finished", sub_status="completed"))}).SerializeToString()
                self.send_response(code)
                self.send_header("content-type", "application/protobuf")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def superlink(request):
    made = FlakySuperLink(request.param)
    yield made
    made.close()


@pytest.mark.parametrize("superlink", [[500, 500, 503]], indirect=True)
def test_a_busy_superlink_is_waited_out_over_one_connection(superlink):
    polls = []
    session = ControlSession(superlink.address, None, sleep=lambda s: None)
    try:
        status = session.wait_for_run(7, on_poll=lambda: polls.append(1))
    finally:
        session.close()
    assert status == ("finished", "completed", "")
    assert len(superlink.ports) == 4 and len(set(superlink.ports)) == 1
    assert len(polls) == 3  # the server checks its SuperLink between the retries


@pytest.mark.parametrize("superlink", [[500] * 1000], indirect=True)
def test_a_superlink_that_keeps_failing_is_given_up_with_the_reason(superlink):
    session = ControlSession(superlink.address, None, window=0.5)
    try:
        with pytest.raises(ControlError, match="ListRuns failed: HTTP 500: database is locked"):
            session.run_status(7)
    finally:
        session.close()
    assert len(superlink.ports) >= 2


@pytest.mark.parametrize("superlink", [[403]], indirect=True)
def test_a_refusal_is_final(superlink):
    session = ControlSession(superlink.address, None, sleep=lambda s: None)
    try:
        with pytest.raises(ControlError, match="HTTP 403"):
            session.run_status(7)
    finally:
        session.close()
    assert len(superlink.ports) == 1


@pytest.mark.parametrize("superlink", [[500]], indirect=True)
def test_a_start_run_that_reached_the_superlink_is_not_sent_twice(superlink, tmp_path):
    from fedtune.deploy.server import write_app

    app = write_app(tmp_path / "app", {"x": 1})
    session = ControlSession(superlink.address, None, sleep=lambda s: None)
    try:
        with pytest.raises(ControlError, match="StartRun failed: HTTP 500"):
            session.submit_run(app, {})
    finally:
        session.close()
    assert superlink.paths == ["/v1/control/start-run"]
