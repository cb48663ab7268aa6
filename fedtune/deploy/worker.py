"""A long-lived ClientApp worker: the base model stays loaded across rounds.

flwr 1.41's SuperNode runs every message in a fresh ``flwr-clientapp`` process (a
SuperExec polls the SuperNode and spawns one per task): ~3 s of imports and a model
load per round. With ``flower-supernode --isolation process`` nothing is spawned and an
outside process is expected to claim tasks; this worker does so in ONE process with the
fedtune ClientApp already in memory, so the model cache (``fedtune.model.cache``) and
the tokenised data survive from round to round.

Per task it does what ``flwr.supernode.runtime.run_clientapp.run_clientapp`` does, with
Flower's own Runtime API helpers, minus installing the FAB and loading the app:
AcquireTask -> heartbeat -> pull message + context -> app -> push reply -> push context.
Two of Flower's helpers SIGINT their own process when a token is revoked (fine for a
one-shot process, fatal for a long-lived one); they are replaced here by versions that
only give up on that task.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedtune.deploy.seal import RunPin, RunRefused

log = logging.getLogger("fedtune")

_RETRYABLE_STATUS = frozenset({502, 503, 504})
#: the one runtime method flwr's SuperExec HMAC protects
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


def _task_retry_invoker(max_time: float) -> RetryInvoker:
    """Retries transport errors and 502/503/504 for at most ``max_time`` seconds; any
    other status (401 = token revoked) gives up on the task, never on the process."""

    def give_up(err: Exception) -> bool:
        return (isinstance(err, httpx.HTTPStatusError)
                and err.response.status_code not in _RETRYABLE_STATUS)

    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=5),
                        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=max_time, should_giveup=give_up)


def _heartbeat(client: RuntimeHttpClient, lost: threading.Event) -> Callable[[], bool]:
    """Flower's task heartbeat, flagging a rejected task instead of raising SIGINT."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False  # HeartbeatSender retries with back-off
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (503, 504):
                return False
            lost.set()
            return True
        if not response.success:
            lost.set()
        return True

    return beat


def error_reply(message: Message, err: Exception) -> Message:
    """The reply Flower's own flwr-clientapp sends when the app raises."""
    reason = f"{type(err)}:<'{err}'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=message)


def refusal_reply(message: Message, err: RunRefused) -> Message:
    """What a client answers a run it does not serve: an error, no computation."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                         reason=f"run refused by this client: {err}"), reply_to=message)


def handle_task(address: str, token: str, app: ClientApp | Callable[[], ClientApp],
                insecure: bool = True, root_certificates: bytes | None = None,
                pin: RunPin | None = None) -> str:
    """Run one claimed task (one message) through ``app``; returns Flower's sub-status.
    With ``pin``, a message of a run the pin refuses is answered with an error and never
    reaches the app. ``app`` may be a loader, called once the task's heartbeat runs: a
    fresh task process imports the whole model stack for it, which on a loaded machine
    takes longer than the SuperNode waits for a first heartbeat."""
    retry = _task_retry_invoker(60.0)
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry)
    lost = threading.Event()
    heartbeat = HeartbeatSender(_heartbeat(client, lost))
    message: Message | None = None
    reply: Message | None = None
    context: Context | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        heartbeat.start()
        message, context, _run, _fab = pull_task_input(client)
        if pin is not None:
            pin.check(message.metadata.run_id, context.run_config)
        client_app = app if isinstance(app, ClientApp) else app()
        reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except RunRefused as err:
        assert message is not None
        log.warning("refused a message of run %s: %s", message.metadata.run_id, err)
        reply, details = refusal_reply(message, err), f"run refused: {err}"
    except Exception as err:  # noqa: BLE001 - the server gets the error as a reply
        log.error("ClientApp task failed: %s", err, exc_info=err)
        details = str(err)
        if message is not None:
            reply = error_reply(message, err)
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as err:  # noqa: BLE001
                log.error("could not send the reply: %s", err)
                status, details = SubStatus.FAILED, f"push failed: {err}"
        retry.max_tries = 3
        push_task_output(client, context, status, details)  # revokes the token: last call
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    if lost.is_set():
        log.warning("the SuperNode rejected this task's heartbeat (it expired)")
    return status


def serve_forever(address: str, app: ClientApp, insecure: bool = True,
                  root_certificates: bytes | None = None, poll_interval: float = 0.1,
                  idle_poll: float = 1.0,
                  max_disconnected: float | None = None, stop: threading.Event | None = None,
                  on_task: Callable[[str, float], None] | None = None,
                  pin: RunPin | None = None,
                  run_task: Callable[[str], str] | None = None,
                  superexec_secret: bytes | None = None) -> int:
    """Claim and run the SuperNode's ClientApp tasks until ``stop`` is set or the
    SuperNode has been unreachable for ``max_disconnected`` seconds; returns the count.
    ``superexec_secret``: the SuperNode's ``--superexec-auth-secret-file`` content, which
    AcquireTask then asks for (flwr's SuperExec HMAC): no other local user claims a task.
    ``run_task(token)`` runs a task elsewhere (a fresh process per message) in place of
    ``app`` here. An idle worker asks every ``poll_interval`` seconds at first, then less
    often, up to every ``idle_poll`` seconds: the SuperNode itself fetches new messages
    only every 3 s when idle, so a tight loop would spend CPU on both sides for nothing."""
    stop = stop or threading.Event()
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if superexec_secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=superexec_secret, protected_methods={ACQUIRE_TASK}))
    acquire = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=root_certificates,
        interceptors=interceptors, retry_invoker=None)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    served, down_since, backoff, idle = 0, None, poll_interval, poll_interval
    try:
        while not stop.is_set():
            try:
                response = acquire.AcquireTask(request)
            except (httpx.TransportError, httpx.HTTPStatusError) as err:
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    log.debug("SuperNode runtime API unreachable: %s", err)
                if max_disconnected is not None and now - down_since > max_disconnected:
                    break
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            down_since, backoff = None, poll_interval
            if not (response.HasField("task") and response.token):
                stop.wait(idle)
                idle = min(idle * 1.5, max(idle_poll, poll_interval))
                continue
            idle = poll_interval
            begun = time.perf_counter()
            status = (run_task(response.token) if run_task is not None else
                      handle_task(address, response.token, app, insecure, root_certificates,
                                  pin))
            served += 1
            if on_task is not None:
                on_task(status, time.perf_counter() - begun)
    finally:
        acquire.close()
    return served
