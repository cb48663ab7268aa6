"""A Flower Grid whose nodes are ClientApps in this process: the strategy's whole round
loop (``run_federation``) without starting an engine.

Flower's simulation engine costs a Ray instance, worker processes that each load the
model, and a 0.1 s poll per message batch; for a test of the strategy and the client
handlers that is most of the time. Here each node is the real ClientApp (called as
``app(message, context)``, as the engine's workers call it) with its own
``flwr.app.Context``: ``node_config`` carries ``partition-id`` / ``num-partitions`` as
the engine gives them, and ``state`` persists between messages. What the engine does
around the call is kept: messages cross a protobuf round trip both ways (so nothing is
shared between server and client and everything must be wire-encodable), a handler
that raises becomes an error reply with the engine's code and reason, and a failed call
leaves the node's context as it was. Handlers run on a thread pool (one thread by
default: one client at a time, in push order), so ``send_and_receive`` honours its
timeout and a slow handler is a straggler. A test can take a node away
(:meth:`InProcessGrid.lose_node`): it leaves ``get_node_ids`` and messages for it are
answered by the "SuperLink" with Flower's Node Unavailable error.

It lives in the package (not under tests/) so benchmarks and users' own tests can run a
federation loop in one process too. The engine itself stays under test elsewhere.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import (
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

if TYPE_CHECKING:
    from fedtune.config import Scenario
    from fedtune.flower.rounds import OnReplies
    from fedtune.flower.server_app import Progress

UserConfig = Mapping[str, bool | float | int | str]


def wire_copy(message: Message) -> Message:
    """``message`` after a trip through Flower's protobuf encoding (what a real transport
    does to it): a copy that shares nothing with the original."""
    data = message_to_proto(message).SerializeToString()
    return message_from_proto(ProtoMessage.FromString(data))


def _copy_context(context: Context) -> Context:
    """A context the handler may change freely (the engine's workers get a copy too)."""
    return Context(run_id=context.run_id, node_id=context.node_id,
                   node_config=dict(context.node_config),
                   state=recorddict_from_proto(recorddict_to_proto(context.state)),
                   run_config=dict(context.run_config))


def error_reply(message: Message, err: Exception) -> Message:
    """The reply the simulation engine sends when a ClientApp raised (same code, same
    reason text: ``fedtune.flower.replies`` and tests read both)."""
    wrapped = ClientAppException(str(err))
    reason = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=message)


def node_unavailable_reply(message: Message) -> Message:
    """What the SuperLink answers for a node that is gone (from its own node id)."""
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_res_message,
    )

    return create_message_error_unavailable_res_message(message.metadata, "node_unavail")


class InProcessGrid(Grid):
    """``num_nodes`` nodes, each the ClientApp ``app`` with its own Context.

    ``node_configs`` (one mapping per node) is merged over the engine's
    ``partition-id`` / ``num-partitions``; ``run_config`` is every node's run config.
    Node ids are random 63-bit numbers from ``seed``, like the engine's (the strategy
    must not rely on them). Close it (or use it as a context manager) to stop the
    handler threads."""

    def __init__(self, app: ClientApp | Callable[[Message, Context], Message], num_nodes: int,
                 *, run_id: int = 1, run_config: UserConfig | None = None,
                 node_configs: Iterable[UserConfig] | None = None, workers: int = 1,
                 seed: int = 0) -> None:
        extra = list(node_configs) if node_configs is not None else [{}] * num_nodes
        if len(extra) != num_nodes:
            raise ValueError(f"{len(extra)} node configs for {num_nodes} nodes")
        rng = random.Random(f"inprocess-grid:{seed}")
        ids: list[int] = []
        while len(ids) < num_nodes:
            node_id = rng.getrandbits(63)
            if node_id not in ids and node_id != SUPERLINK_NODE_ID:
                ids.append(node_id)
        self.app = app
        self._run = Run.create_empty(run_id)
        # this process is the ServerApp's: its messages come from the SuperLink's node (as
        # Flower's run_simulation sets it for the ServerApp thread)
        TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.contexts: dict[int, Context] = {
            node_id: Context(run_id=run_id, node_id=node_id,
                             node_config={PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes,
                                          **extra[i]},
                             state=RecordDict(), run_config=dict(run_config or {}))
            for i, node_id in enumerate(ids)}
        self.lost: set[int] = set()
        #: the metadata of every message a node received, in the order they arrived
        self.delivered: list[Any] = []
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="node")
        self._pending: dict[str, Future[Message]] = {}
        self._lock = threading.Lock()

    # ---- Grid ---------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if n not in self.lost]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            meta = message.metadata.__dict__
            if message.metadata.message_id or message.metadata.reply_to_message_id:
                raise ValueError(f"message already sent or a reply: {message.metadata}")
            meta["_message_id"] = str(uuid4())
            sent = wire_copy(message)
            with self._lock:
                self._pending[message.metadata.message_id] = self._pool.submit(
                    self._deliver, sent)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        with self._lock:
            for message_id in message_ids:
                future = self._pending.get(message_id)
                if future is not None and future.done():
                    del self._pending[message_id]
                    replies.append(future.result())
        return replies

    def wait_for_replies(self, message_ids: Iterable[str], timeout: float) -> None:
        """Until one of ``message_ids`` has a reply to pull, or ``timeout`` seconds."""
        with self._lock:
            futures = {self._pending[i] for i in message_ids if i in self._pending}
        if futures:
            wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
        else:  # none of them was sent here: nothing will come
            time.sleep(timeout)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        ids = self.push_messages(messages)
        with self._lock:
            futures = {self._pending[i] for i in ids}
        _wait_all(futures, timeout)
        return self.pull_messages(ids)

    # ---- nodes --------------------------------------------------------------------------
    def partition_of(self, node_id: int) -> int:
        return int(self.contexts[node_id].node_config[PARTITION_ID_KEY])

    def node_of(self, partition: int) -> int:
        return next(n for n in self.contexts if self.partition_of(n) == partition)

    def lose_node(self, node_id: int) -> None:
        """The node disconnects: it is no longer listed, and what is sent to it (or was
        sent and not yet handled) is answered with Node Unavailable."""
        self.lost.add(node_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> InProcessGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one message --------------------------------------------------------------------
    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if node not in self.contexts or node in self.lost:
            return node_unavailable_reply(message)
        self.delivered.append(message.metadata)
        context = _copy_context(self.contexts[node])
        try:
            reply = self.app(message, context)
        except Exception as err:  # noqa: BLE001 - the engine turns any failure into a reply
            reply = error_reply(message, err)
        else:
            self.contexts[node] = context  # as the engine: only a completed call updates it
        reply = wire_copy(reply)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply


def _wait_all(futures: set[Future[Message]], timeout: float | None) -> None:
    """Until every future is done or ``timeout`` seconds have passed."""
    end = None if timeout is None else time.monotonic() + timeout
    while futures:
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            return
        _, futures = wait(futures, timeout=left, return_when=FIRST_COMPLETED)


def simulate_in_process(scenario: Scenario, out_dir: str | Path | None = None,
                        progress: Progress | None = None, verbose: bool = False,
                        resume: Path | None = None, on_replies: OnReplies | None = None,
                        say: Callable[[str], None] | None = None,
                        **grid_options: Any) -> Path:
    """``fedtune.runs.simulate.simulate`` with the same contract (checks before any
    file, the run directory, ``SimulationError`` on failure) on an :class:`InProcessGrid`
    of ``data.num_clients`` nodes running ``make_client_app(scenario)``."""
    import torch

    from fedtune.flower.client_app import make_client_app
    from fedtune.flower.server_app import run_federation
    from fedtune.runs import SimulationError
    from fedtune.runs.rundir import new_run_dir
    from fedtune.runs.simulate import check_output_folder, completed, preflight

    del verbose  # nothing of the engine's to show
    check_output_folder(out_dir or scenario.run.out_dir, resume)
    preflight(scenario)
    run_dir = resume or new_run_dir(out_dir or scenario.run.out_dir, scenario.run.name)
    if say is not None:
        say(f"run directory {run_dir}")
    threads = torch.get_num_threads()  # the ClientApp sets simulation.cpus_per_client
    with InProcessGrid(make_client_app(scenario), scenario.data.num_clients,
                       **grid_options) as grid:
        try:
            run_federation(grid, scenario, run_dir, progress, resume=resume is not None,
                           on_replies=on_replies)
        except Exception as err:
            raise SimulationError(f"simulation failed: {err} (run directory: {run_dir})"
                                  ) from err
        finally:
            torch.set_num_threads(threads)
    return completed(scenario, run_dir, say)
