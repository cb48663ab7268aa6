"""Sending messages through a Grid and collecting the replies as they arrive.

``Grid.send_and_receive`` (Flower's grid of a deployed SuperLink) looks for replies, and
when some are missing sleeps 3 s before it looks again, and says nothing until the last
reply or the deadline. :func:`exchange` polls soon after sending, backing off while
nothing arrives, and reports each reply: a round, or the discovery of who the clients
are, ends when its last reply arrives rather than up to 3 s later. A grid that can block
until a reply is in (:class:`WaitsForReplies`, the in-process Grid) is waited on instead
of polled, so not even the backoff is lost.

A deployed SuperLink's replies are pulled through :class:`BoundedGrid`: a reply is
refused by its record names and its size while it is read, never after it was
materialised (an admitted client can push any number of objects of up to 64 MiB each).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.flower.replies import ReplyBudget, check_reply_shape

log = logging.getLogger("fedtune")

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


class RefusedReply(ValueError):
    """A reply refused while it was pulled, before what it declares was read."""


def pull_bounded(object_tree: Any, pull_object: Callable[[str], bytes],
                 budget: ReplyBudget) -> dict[str, bytes]:
    """The contents of every object of one reply, read in the order that lets the
    server refuse it early: the tree (ids only) is held to ``budget.max_objects``, then
    the reply's RecordDict object (record names -> ids) to the records a reply may
    carry, then the rest is pulled while the bytes so far stay within
    ``budget.max_bytes``. RefusedReply says why, once at most one object past the budget
    was read (each is under the front's 64 MiB request cap)."""
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_object_body, iterate_object_tree
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    ids = [node.object_id for node in iterate_object_tree(object_tree)]
    if budget.max_objects and len(ids) > budget.max_objects:
        raise RefusedReply(f"reply of {len(ids)} objects, more than the "
                           f"{budget.max_objects} a reply of this federation can have")
    contents: dict[str, bytes] = {}
    if object_tree.children:
        if len(object_tree.children) != 1:
            raise RefusedReply(f"a message with {len(object_tree.children)} contents")
        content = object_tree.children[0]
        # with Flower's retries: a reply is listed before all its objects have arrived
        contents.update(pull_objects([content.object_id], pull_object))
        try:
            names = json.loads(get_object_body(contents[content.object_id], RecordDict))
        except (ValueError, UnicodeDecodeError) as err:
            raise RefusedReply(f"the reply's content is no RecordDict: {err}") from None
        subtrees = {child.object_id: child for child in content.children}
        if not isinstance(names, dict) or set(names.values()) != set(subtrees):
            raise RefusedReply("the reply's record names do not match its objects")
        try:
            check_reply_shape({name: len(subtrees[oid].children)
                               for name, oid in names.items()}, budget)
        except ValueError as err:
            raise RefusedReply(str(err)) from None
    pulled = [sum(len(c) for c in contents.values())]
    lock = threading.Lock()

    def counted(object_id: str) -> bytes:
        data = pull_object(object_id)
        with lock:
            pulled[0] += len(data)
            if budget.max_bytes and pulled[0] > budget.max_bytes:
                raise _OverBudget(pulled[0])
        return data

    rest = [i for i in dict.fromkeys(ids) if i not in contents]
    try:
        contents.update(pull_objects(rest, counted))
    except _OverBudget as over:
        raise RefusedReply(f"reply larger than the {budget.max_bytes} bytes a reply of "
                           f"this federation can have ({over.args[0]} read)") from None
    return contents


class _OverBudget(Exception):
    pass


class WrappedGrid(Grid):
    """A Grid that hands every call to ``grid``; subclasses change the calls they need.
    ``send_and_receive`` goes through :func:`exchange` on the wrapper, so its pulls and
    pushes are the wrapper's own."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()  # type: ignore[no-any-return]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)  # type: ignore[no-any-return]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)  # type: ignore[no-any-return]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return exchange(self, list(messages), 3600.0 if timeout is None else timeout)


class BoundedGrid(WrappedGrid):
    """A deployed SuperLink's Grid (flwr's ``HttpGrid``) whose replies are pulled with
    :func:`pull_bounded`: Flower's own ``pull_messages`` reads every object of a reply
    into memory before anyone can look at it. A refused reply comes back as an error
    reply of its sender, its reason logged, and is confirmed so the SuperLink frees it.
    Everything else is the wrapped Grid's."""

    def __init__(self, grid: Any, budget: ReplyBudget) -> None:
        super().__init__(grid)
        self.budget = budget

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import (
            ObjectPullError,
            inflate_object_from_contents,
        )

        grid = self.grid
        client = grid._runtime_client  # noqa: SLF001 - flwr is pinned (see pyproject)
        run_id = grid.run.run_id
        res = client.PullMessages(PullAppMessagesRequest(message_ids=list(message_ids)))
        pull_object = make_pull_object_fn_protobuf(client.PullObject, grid.node, run_id)
        messages = []
        for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
            meta = proto.metadata
            try:
                contents = pull_bounded(tree, pull_object, self.budget)
            except (RefusedReply, ObjectPullError) as err:
                refused = isinstance(err, RefusedReply)
                if refused:
                    log.warning("refused the reply of node %s before reading it: %s",
                                meta.src_node_id, err)
                    client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(
                        node=grid.node, run_id=run_id, message_object_id=meta.message_id))
                messages.append(_error_reply(meta, run_id, str(err) if refused else
                                             f"reply objects unavailable: {err}"))
                continue
            client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(
                node=grid.node, run_id=run_id, message_object_id=meta.message_id))
            message = inflate_object_from_contents(meta.message_id, contents)
            message.metadata.__dict__["_message_id"] = meta.message_id
            messages.append(message)
        return messages


def _error_reply(meta: Any, run_id: int, reason: str) -> Message:
    """An error reply standing for a reply that was refused, in its sender's name."""
    from flwr.app import Metadata
    from flwr.app.error import Error
    from flwr.app.message import make_message
    from flwr.common.constant import ErrorCode

    return make_message(
        metadata=Metadata(run_id=run_id, message_id="", src_node_id=meta.src_node_id,
                          dst_node_id=meta.dst_node_id, message_type=meta.message_type,
                          group_id=meta.group_id, ttl=0,
                          reply_to_message_id=meta.reply_to_message_id,
                          created_at=time.time()),
        error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=f"refused: {reason}"))


def bounded(grid: Grid, budget: ReplyBudget) -> Grid:
    """``grid`` with bounded pulls when it is a deployed SuperLink's (an ``HttpGrid``);
    the simulation engine's and the in-process Grid hand over replies already in this
    process, so they stay as they are."""
    from flwr.superlink.grid.http_grid import HttpGrid

    return BoundedGrid(grid, budget) if isinstance(grid, HttpGrid) else grid
