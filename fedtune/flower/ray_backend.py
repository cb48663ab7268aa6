"""Flower's Ray backend, with workers that can be lost (a node of the cluster dies).

flwr 1.41's ``RayBackend`` hands each of the engine's threads an actor from a list and
``ray.get``s the client's result. When that raises because the actor is gone (its process
or its whole node died: ``ActorUnavailableError`` at once, ``ActorDiedError`` once Ray
has declared the node dead), it puts the dead actor back into the list and re-raises: the
client's reply becomes an error, and so does the reply of every later message that draws
the dead actor, round after round, until the run ends.

Here such an actor is taken out of the pool for good (and killed, so a live one that only
lost its connection frees its resources): the client it was running costs its round one
reply (an error reply; the strategy drops and counts it, and the round goes on with
``federation.min_clients``), and the actors that are left serve every later message. The
engine's threads (one per actor at the start) that now outnumber the actors wait for a
free one. Lost actors are not replaced: a dead node's resources are gone, and a new actor
asking for them would wait forever. When the last actor is gone, every message fails at
once (so the round fails on its minimum rather than waiting for ``round_timeout``).

A stop (``fedtune.flower.stop.StopRequest``: a signal to the simulating process) kills
every actor at once, the busy ones too: the engine's threads then end within seconds
rather than after the clients' training, and Flower's backend shuts Ray down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import ClientAppActor, pool_size_from_resources

from fedtune.flower.stop import StopRequest

log = logging.getLogger("fedtune")

#: what ``ray.get`` raises when the worker that ran a client is gone with its result
LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


class WorkerLostError(RuntimeError):
    """The Ray worker running a client died (its process or its node) before replying."""


class ActorPool:
    """Client actors, one client at a time each; a lost one is retired, not returned."""

    def __init__(self, client_resources: dict[str, Any], actor_kwargs: dict[str, Any],
                 size: int | None = None) -> None:
        size = pool_size_from_resources(client_resources) if size is None else size
        self._idle = [ClientAppActor.options(**client_resources).remote(**actor_kwargs)
                      for _ in range(size)]
        self._all = list(self._idle)
        self.num_actors = size
        self.lost = 0
        self.stopped = False
        self._cond = threading.Condition()

    def take(self) -> Any:
        """An idle actor; waits while all are busy; raises when none is left at all."""
        with self._cond:
            while not self._idle:
                if self.stopped:
                    raise WorkerLostError("the simulation is stopping")
                if self.num_actors == 0:
                    raise WorkerLostError(
                        f"every Ray worker of the simulation is gone ({self.lost} lost); "
                        "no client can run")
                self._cond.wait()
            return self._idle.pop()

    def give_back(self, actor: Any) -> None:
        with self._cond:
            self._idle.append(actor)
            self._cond.notify()

    def retire(self, actor: Any) -> int:
        """Take a lost actor out for good; how many are left."""
        with self._cond:
            self.num_actors -= 1
            self.lost += 1
            left = self.num_actors
            self._cond.notify_all()
        with contextlib.suppress(Exception):  # already dead, or its node is
            ray.kill(actor, no_restart=True)
        return left

    def kill_all(self) -> None:
        """Stop: every actor killed, idle or busy (a busy one's ``ray.get`` fails)."""
        with self._cond:
            self.stopped = True
            actors, self._idle, self.num_actors = self._all, [], 0
            self._cond.notify_all()
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    def is_actor_available(self) -> bool:
        with self._cond:
            return bool(self._idle)

    def terminate_all_actors(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
        for actor in idle:
            with contextlib.suppress(Exception):
                actor.terminate.remote()


class ResilientRayBackend(raybackend.RayBackend):
    """``RayBackend`` whose pool survives lost actors (see the module's docstring)."""

    #: set by :func:`installed` for the simulation that builds this backend
    stop: StopRequest | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        pool = ActorPool(self.client_resources, self.actor_kwargs)
        self.pool = pool  # type: ignore[assignment]
        self.app_fn = app_fn
        log.debug("fedtune: %d Ray client actors", pool.num_actors)
        if self.stop is not None:
            threading.Thread(target=_kill_on_stop, args=(self.stop, pool), daemon=True,
                             name="fedtune-stop-actors").start()

    def terminate(self) -> None:
        pool: ActorPool | None = self.pool  # type: ignore[assignment]
        if pool is not None:
            pool.stopped = True  # ends the stop watcher
        super().terminate()

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.pool is None or self.app_fn is None:
            raise ValueError("build() the backend before it processes messages")
        pool: ActorPool = self.pool  # type: ignore[assignment]
        partition = str(context.node_config[PARTITION_ID_KEY])
        try:
            actor = pool.take()
        except WorkerLostError:
            if pool.stopped:
                return _stopping(message), context
            raise
        try:
            _, reply, updated = ray.get(actor.run.remote(self.app_fn, message, partition,
                                                         context))
        except LOST as err:
            if pool.stopped:
                return _stopping(message), context
            left = pool.retire(actor)
            log.warning("fedtune: the Ray worker running client %s was lost (%s); %d "
                        "worker(s) left", partition, type(err).__name__, left)
            raise WorkerLostError(
                f"the Ray worker running client {partition} was lost before it replied "
                f"({type(err).__name__}: its process or its node died); {left} worker(s) "
                "left") from None
        except BaseException:
            pool.give_back(actor)  # the client failed, its worker did not
            raise
        pool.give_back(actor)
        return reply, updated


def _stopping(message: Message) -> Message:
    """The reply to a message the stopping simulation did not run (the engine would log
    a raised error with its traceback)."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.UNKNOWN, reason="the simulation is stopping"),
                   reply_to=message)


def _kill_on_stop(stop: StopRequest, pool: ActorPool) -> None:
    """Kill the pool's actors once ``stop`` is set (until the backend terminates)."""
    while not stop.wait(0.2):
        if pool.stopped:
            return
    if not pool.stopped:
        pool.kill_all()


@contextlib.contextmanager
def installed(stop: StopRequest | None = None) -> Iterator[None]:
    """While Flower's simulation engine starts in this process, it builds this backend
    (``vce_api`` imports ``raybackend.RayBackend`` when it starts the runtime), whose
    actors all die once ``stop`` is set."""
    original = raybackend.RayBackend
    backend = type("ResilientRayBackend", (ResilientRayBackend,), {"stop": stop})
    raybackend.RayBackend = backend  # type: ignore[misc]
    try:
        yield
    finally:
        raybackend.RayBackend = original  # type: ignore[misc]
