"""A client gives up once its server has stopped answering for ``reconnect_for`` seconds
(the SDK federation checks it with real processes: tests/sdk/test_federation.py), and
starts its SuperNode again while the server refuses to activate its node (a client
restarted within its previous connection's heartbeat window; with real processes:
tests/deploy/test_lifecycle.py)."""

from __future__ import annotations

import os
import sys
import threading
import time

from fedtune.deploy.client import (
    ACTIVATION_REFUSED,
    CONNECTION_ERROR,
    ClientOptions,
    SuperNode,
    watch_server,
)


def _watch(answers, reconnect_for: float, run_for: float) -> tuple[bool, bool, float]:
    """(gave up, stop set, seconds) after watching for at most ``run_for`` seconds."""
    options = ClientOptions(server="127.0.0.1:1", data="x", reconnect_for=reconnect_for)
    stop, gave_up = threading.Event(), threading.Event()
    thread = threading.Thread(target=watch_server, args=(options, stop, gave_up, answers))
    begun = time.monotonic()
    thread.start()
    thread.join(run_for)
    seconds = time.monotonic() - begun
    stop.set()
    thread.join()
    return gave_up.is_set(), stop.is_set(), seconds


def test_a_server_that_stopped_answering_is_given_up_after_reconnect_for():
    gave_up, stopped, seconds = _watch(lambda options: False, 0.3, 5.0)
    assert gave_up and stopped
    assert 0.3 <= seconds < 2.0


def test_a_server_that_answers_again_in_time_is_kept():
    calls = iter([False, True] * 1000)  # every failed probe is followed by an answer
    gave_up, _, _ = _watch(lambda options: next(calls), 0.3, 1.5)
    assert not gave_up


def _supernode(tmp_path, refusals: int, said_code: str = CONNECTION_ERROR):
    """A stand-in for flower-supernode: its first ``refusals`` starts end as flwr's does
    when ActivateNode is refused, the next one runs until stopped."""
    tries = tmp_path / "tries"
    script = (f"import pathlib, sys, time\np = pathlib.Path({str(tries)!r})\n"
              "n = len(p.read_text()) if p.exists() else 0\np.write_text('x' * (n + 1))\n"
              f"if n < {refusals}:\n    print({said_code!r}, {ACTIVATION_REFUSED!r})\n"
              "    sys.exit(1)\n"
              "time.sleep(60)\n")
    stop, said = threading.Event(), []
    node = SuperNode([sys.executable, "-c", script], dict(os.environ), tmp_path / "log",
                     stop, said.append)
    node.retry_pause = 0.1
    thread = threading.Thread(target=node.watch)
    thread.start()
    return node, thread, tries, stop, said


def test_a_supernode_refused_activation_is_started_again(tmp_path):
    node, thread, tries, stop, said = _supernode(tmp_path, refusals=2)
    deadline = time.monotonic() + 30
    while not (tries.exists() and len(tries.read_text()) == 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert len(tries.read_text()) == 3 and node.process.poll() is None
    assert not stop.is_set() and not node.ended.is_set() and len(said) == 2
    node.stop()
    thread.join(15)
    assert not node.ended.is_set()  # stopped as asked, not ended by itself


def test_a_supernode_ending_otherwise_is_not_started_again(tmp_path):
    node, thread, tries, stop, said = _supernode(tmp_path, refusals=1, said_code="Exit Code: 302")
    thread.join(15)
    assert node.ended.is_set() and stop.is_set() and said == []
    assert len(tries.read_text()) == 1 and node.returncode == 1
