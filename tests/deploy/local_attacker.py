"""Another local user on the server or a client machine, for the deployment tests.

The tests run as root; the attacker is a forked child that drops to ``nobody`` (no
access to the server's or the clients' private folders, which the interpreter under
/root cannot be started as either) and uses Flower's own HTTP clients, so a surface
left open would answer it exactly as it answers Flower. It finds its targets as such a
user would: in the process table (every command line is world-readable), within the
process trees of the given pids only, so it never touches another federation on the
machine. Everything it tries is bounded in time and goes to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import psutil
from flwr.common.serde import fab_to_proto
from flwr.proto.control_pb2 import ListRunsRequest, RegisterNodeRequest, StartRunRequest
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.control.control_http_client import ControlHttpClient
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

NOBODY = 65534


def can_drop_privileges() -> str | None:
    """None when a child can become another user, else why not (the skip reason)."""
    if os.geteuid() != 0:
        return "the local-user attacks need root, to run the attacker as another user"
    return None


def as_another_user(work: Callable[..., dict], *args: Any, timeout: float = 300,
                    uid: int = NOBODY) -> dict:
    """``work(*args)`` in a forked child running as ``uid`` (no supplementary groups);
    its JSON-able result, or {"crashed": why}."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges first, then attack; never return
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = work(*args)
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            result = {"crashed": repr(err)}
        data = json.dumps(result).encode()
        while data:
            data = data[os.write(write, data):]
        os._exit(0)
    os.close(write)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read], [], [], 1.0)
            if ready:
                chunk = os.read(read, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    return json.loads(text) if text else {"crashed": "no result (timed out)"}


def tree(pids: list[int]) -> list[psutil.Process]:
    """The given processes and all their descendants that still run."""
    found = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            found += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return found


def command_lines(pids: list[int]) -> list[list[str]]:
    lines = []
    for process in tree(pids):
        try:
            lines.append(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return lines


def _port_of(line: list[str]) -> str | None:
    return line[line.index("--port") + 1] if "--port" in line else None


def runtime_addresses(pids: list[int], *markers: str) -> set[str]:
    """``127.0.0.1:PORT`` of every process in the trees whose command line holds all
    ``markers`` (``fedtune.deploy.superlink``, ``flower-supernode``, a path, a port)."""
    return {f"127.0.0.1:{port}" for line in command_lines(pids)
            if all(m in " ".join(line) for m in markers) and (port := _port_of(line))}


def _answers(address: str) -> bool:
    try:
        return httpx.get(f"https://{address}/health", verify=False, timeout=5).is_success
    except httpx.HTTPError:
        return False


def _status(err: Exception) -> int | str:
    if isinstance(err, httpx.HTTPStatusError):
        return err.response.status_code
    return type(err).__name__


def control_client(address: str) -> ControlHttpClient:
    """Flower's Control API client, as the ``flwr`` CLI builds it; no certificate check
    (the loopback CA is private to the server's user)."""
    return ControlHttpClient(f"https://{address}", verify=False, interceptors=[
        RuntimeVersionHttpInterceptor(component_name="flwr CLI")])


def scheme(task_type: str) -> str:
    """The SuperLink's loopback port speaks TLS, a SuperNode's runtime API plain HTTP."""
    return "https" if task_type == TaskType.SERVER_APP else "http"


def runtime_client(address: str, token: str = "", task_type: str = TaskType.SERVER_APP
                   ) -> RuntimeHttpClient:
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient(f"{scheme(task_type)}://{address}", verify=False,
                             interceptors=interceptors)


def try_control(address: str, fab: bytes) -> dict:
    """StartRun with the attacker's own app, ListRuns, RegisterNode of its own key."""
    client, tried = control_client(address), {}
    calls = {
        "start_run": lambda: client.StartRun(StartRunRequest(
            fab=fab_to_proto(Fab(_sha256(fab), fab, {})), federation="")).run_id,
        "list_runs": lambda: len(client.ListRuns(ListRunsRequest()).run_dict),
        "register_node": lambda: client.RegisterNode(
            RegisterNodeRequest(public_key=b"attacker-key")).node_id}
    for name, call in calls.items():
        try:
            tried[name] = {"accepted": str(call())}
        except Exception as err:  # noqa: BLE001 - whatever Flower's client raises
            tried[name] = {"refused": _status(err)}
    client.close()
    return tried


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def try_acquire(addresses: set[str], task_type: str, seconds: float, every: float
                ) -> dict[str, dict]:
    """AcquireTask on each runtime API every ``every`` seconds for ``seconds`` (after
    one health probe each): how each answered, and any token it handed out (then
    tried)."""
    clients = {a: runtime_client(a, task_type=task_type) for a in addresses}
    seen: dict[str, dict] = {a: {"answers": {}, "tokens": [], "health": None}
                             for a in addresses}
    for address in addresses:
        try:  # the attacker does reach it: only the credential is missing
            seen[address]["health"] = httpx.get(f"{scheme(task_type)}://{address}/health",
                                                verify=False, timeout=5).status_code
        except httpx.HTTPError as err:
            seen[address]["health"] = type(err).__name__
    request = AcquireTaskRequest(supported_task_types=[task_type])
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        for address, client in clients.items():
            try:
                response = client.AcquireTask(request)
                key = "ok"
                if response.HasField("task") and response.token:
                    seen[address]["tokens"].append(_use_token(address, response.token,
                                                              task_type))
            except Exception as err:  # noqa: BLE001
                key = str(_status(err))
            answers = seen[address]["answers"]
            answers[key] = answers.get(key, 0) + 1
        time.sleep(every)
    for client in clients.values():
        client.close()
    return seen


def _use_token(address: str, token: str, task_type: str) -> dict:
    """What a claimed task gives away: its input (the message, the node config)."""
    client = runtime_client(address, token, task_type)
    try:
        client.PullTaskInput(PullTaskInputRequest())
        return {"token": token, "pulled_input": True}
    except Exception as err:  # noqa: BLE001
        return {"token": token, "pulled_input": str(_status(err))}
    finally:
        client.close()


def attack_server(pids: list[int], fab: bytes, seconds: float, every: float = 0.01) -> dict:
    """On the server machine: the Control API, then AcquireTask of the ServerApp task."""
    addresses = runtime_addresses(pids, "fedtune.deploy.superlink")
    result: dict[str, Any] = {"uid": os.getuid(), "superlinks": sorted(addresses)}
    result["control"] = {a: try_control(a, fab) for a in addresses}
    result["acquire"] = try_acquire(addresses, TaskType.SERVER_APP, seconds, every)
    result["command_lines"] = command_lines(pids)
    return result


def attack_federation(root: int, superlink: list[str], supernode: list[str], fab: bytes,
                      seconds: float, every: float = 0.01) -> dict:
    """A running federation, from both machines at once: wait for its SuperLink (the
    process under ``root`` whose command line holds ``superlink``), try its Control API,
    then AcquireTask there (every ``every`` s, the ServerApp task of the sealed run is
    pending once) and on every SuperNode holding ``supernode`` as they appear, until
    the SuperLink is gone (at most ``seconds``); every command line seen in the tree."""
    deadline = time.monotonic() + 240
    addresses: set[str] = set()
    while not addresses and time.monotonic() < deadline:
        addresses = runtime_addresses([root], "fedtune.deploy.superlink", *superlink)
        time.sleep(0.05)
    for address in addresses:  # found in the process table: wait until it listens
        while time.monotonic() < deadline and not _answers(address):
            time.sleep(0.1)
    result: dict[str, Any] = {"uid": os.getuid(), "superlinks": sorted(addresses),
                              "control": {a: try_control(a, fab) for a in addresses}}
    servers = try_acquire(addresses, TaskType.SERVER_APP, 1.0, every)
    nodes: dict[str, dict] = {}
    lines: list[list[str]] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until and runtime_addresses([root], "fedtune.deploy.superlink",
                                                         *superlink):
        lines += [line for line in command_lines([root]) if line not in lines]
        found = runtime_addresses([root], "flower-supernode", *supernode)
        window = max(0.0, min(5.0, until - time.monotonic()))
        for kind, targets, seen in ((TaskType.SERVER_APP, addresses, servers),
                                    (TaskType.CLIENT_APP, found, nodes)):
            for address, got in try_acquire(targets, kind, window, every * 10).items():
                mine = seen.setdefault(address, {"answers": {}, "tokens": [],
                                                 "health": got["health"]})
                if got["health"] == 200:  # reached at least once (not a SuperNode gone)
                    mine["health"] = 200
                mine["tokens"] += got["tokens"]
                for key, count in got["answers"].items():
                    mine["answers"][key] = mine["answers"].get(key, 0) + count
        if not found:
            time.sleep(every)
    result.update(acquire=servers, supernodes=nodes, command_lines=lines)
    return result


def warm_up() -> None:
    """Load what the attack imports lazily, before the fork: the child, as nobody,
    cannot read the interpreter's files under /root."""
    for client in (control_client("127.0.0.1:9"), runtime_client("127.0.0.1:9", "x")):
        try:
            client.ListRuns(ListRunsRequest()) if isinstance(client, ControlHttpClient) \
                else client.AcquireTask(AcquireTaskRequest())
        except Exception:  # noqa: BLE001 - nothing listens there
            pass
        client.close()
    try:
        httpx.get("https://127.0.0.1:9/health", verify=False, timeout=1)
    except httpx.HTTPError:
        pass
