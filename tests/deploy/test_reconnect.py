"""A client gives up once its server has stopped answering for ``reconnect_for`` seconds
(the SDK federation checks it with real processes: tests/sdk/test_federation.py)."""

from __future__ import annotations

import threading
import time

from fedtune.deploy.client import ClientOptions, watch_server


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
