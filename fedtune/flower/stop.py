"""Stopping a run from outside its round loop (a signal to the process that runs it).

The round loop runs in a thread of its own under Flower's simulation engine, and Python
delivers a signal to the main thread only, so the loop cannot be interrupted where it
happens to be. It is asked instead: :class:`StopRequest` is set, and the loop's next
call of the Grid (it polls for replies at least once a second) raises
:class:`RunStopped`. The round in progress is lost; every completed round is already
recorded and checkpointed (``fedtune.flower.server_app``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.flower.polling import WrappedGrid


class RunStopped(RuntimeError):
    """The run was asked to stop (:class:`StopRequest`) before it completed."""


class StopRequest:
    """Set once, from any thread: why the run must stop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def check(self) -> None:
        """Raise RunStopped once a stop was requested."""
        if self._event.is_set():
            raise RunStopped(self.reason or "stopped")


class StoppableGrid(WrappedGrid):
    """``grid``, whose every call first checks ``stop`` (see the module's docstring)."""

    def __init__(self, grid: Grid, stop: StopRequest) -> None:
        super().__init__(grid)
        self.stop = stop

    def get_node_ids(self) -> Iterable[int]:
        self.stop.check()
        return super().get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        self.stop.check()
        return super().get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.stop.check()
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.stop.check()
        return super().pull_messages(message_ids)
