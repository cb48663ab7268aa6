"""Sending messages through a Grid and collecting the replies as they arrive.

``Grid.send_and_receive`` (Flower's grid of a deployed SuperLink) looks for replies, and
when some are missing sleeps 3 s before it looks again, and says nothing until the last
reply or the deadline. :func:`exchange` polls soon after sending, backing off while
nothing arrives, and reports each reply: a round, or the discovery of who the clients
are, ends when its last reply arrives rather than up to 3 s later. A grid that can block
until a reply is in (:class:`WaitsForReplies`, the in-process Grid) is waited on instead
of polled, so not even the backoff is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from flwr.app import Message
from flwr.serverapp import Grid

#: polling the grid for replies: first after this many seconds, backing off to the most
POLL_FIRST, POLL_MOST = 0.05, 1.0


@runtime_checkable
class WaitsForReplies(Protocol):
    """A grid that can block until one of the messages has a reply (or ``timeout``)."""

    def wait_for_replies(self, message_ids: Iterable[str], timeout: float) -> None: ...


def exchange(grid: Grid, messages: list[Message], timeout: float,
             report: Callable[[int, int], None] = lambda finished, sampled: None
             ) -> list[Message]:
    """``Grid.send_and_receive``, calling ``report(finished, sampled)`` when the messages
    are sent and again each time more replies have arrived. The pushed messages carry
    their ids afterwards (``metadata.message_id``)."""
    waiting = set(grid.push_messages(messages))
    sampled = len(waiting)
    report(0, sampled)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    pause = POLL_FIRST
    waiter = grid if isinstance(grid, WaitsForReplies) else None
    while waiting and time.monotonic() < deadline:
        left = max(0.0, deadline - time.monotonic())
        if waiter is not None:
            waiter.wait_for_replies(waiting, left)
        else:
            time.sleep(min(pause, left))
        arrived = list(grid.pull_messages(waiting))
        if not arrived:
            pause = min(POLL_MOST, pause * 1.5)
            continue
        replies.extend(arrived)
        waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
        report(len(replies), sampled)
        pause = POLL_FIRST
    return replies
