"""``fedtune client``: a Flower SuperNode plus a long-lived worker that runs the ClientApp.

Everything that can be checked without the server is checked first (the data file, the
profile, the server's address and, with TLS, its certificate), so a mistake ends in a
clear message and a non-zero exit instead of a client that retries forever. The
SuperNode (Flower's own client process, ``--isolation process``) keeps the connection
and the heartbeats; this process claims its tasks (``fedtune.deploy.worker``), so the
base model is loaded once and stays loaded across rounds. The SuperNode reconnects by
itself when the server restarts.

The client's state folder (``--state-dir``, by default a persistent one per user,
server and name: ``default_state_dir``) is private to its user (0700): it holds the run
pins (which seals this client has served, so a restart does not accept an older one)
and, made anew at each start, the SuperExec secret without which the SuperNode's
runtime API hands out no task (so no other local user can claim one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.data.local import MEMORY_PREFIX, read_local_texts
from fedtune.data.types import DataError
from fedtune.deploy.seal import RunPin
from fedtune.deploy.server import flower_bin, flower_env, free_port, stop_process, tail
from fedtune.deploy.superlink import new_secret_file
from fedtune.deploy.task import TOKEN_VARIABLE, load_app
from fedtune.deploy.task import command as task_command
from fedtune.privacy.floor import PrivacyFloor

log = logging.getLogger("fedtune")

#: the runs this client served (``fedtune.deploy.seal.RunPin``), in its state folder
PIN_FILE = "run-pins.json"
#: the SuperNode's SuperExec secret (AcquireTask), in its state folder, new each start
SUPEREXEC_SECRET = "superexec.secret"

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp


class ClientError(RuntimeError):
    """The client cannot start or was refused; the message says why."""


@dataclass(frozen=True)
class ClientOptions:
    server: str  # HOST:PORT of the server's SuperLink
    data: str
    profile: str = ""  # bundled name or path; "" = the server's defaults
    name: str = ""  # "" = the data file's stem
    root_certificates: str = ""  # the CA that signed the server's certificate
    insecure: bool = False
    auth_key: str = ""  # OpenSSH private key registered with the server
    #: run pins, FLWR_HOME and the SuperNode's log; "" = ``default_state_dir``
    state_dir: str = ""
    app: str = "fedtune.flower.client_app:app"
    #: a model source this client trains in place of the federation's base (its own copy
    #: of the same base: a local folder, or a model an application lent, see the SDK)
    model: str = ""
    connect_wait: float = 30.0  # seconds to keep trying to reach the server at start
    #: seconds to keep trying when the server stops answering (a restart, a network cut)
    #: before the client gives up with an error; 0 = forever
    reconnect_for: float = 600.0
    #: False: a fresh ClientApp process (imports + model load) per message, Flower's
    #: default cost; kept to measure what the long-lived worker saves
    long_lived: bool = True
    #: the weakest client-level DP this client trains under (docs/privacy.md, "What a
    #: client enforces"); unset bounds nothing
    privacy_floor: PrivacyFloor = field(default_factory=PrivacyFloor)

    @property
    def client_name(self) -> str:
        return self.name or Path(self.data).stem

    @property
    def data_path(self) -> str:
        """Where the ClientApp reads the data: an absolute path, or texts held in memory."""
        if self.data.startswith(MEMORY_PREFIX):
            return self.data
        return str(Path(self.data).resolve())


def check_local(options: ClientOptions) -> int:
    """The data and profile, before anything connects; returns the number of texts."""
    try:
        texts = read_local_texts(options.data)
    except DataError as err:
        raise ClientError(str(err)) from None
    if len(texts) < 2:
        raise ClientError(f"data file {options.data} has {len(texts)} text; need at least 2")
    if options.model:
        from fedtune.model.loading import ModelNotFoundError, check_model_source

        try:
            check_model_source(options.model)
        except (ModelNotFoundError, ValueError) as err:
            raise ClientError(str(err)) from None
    if options.profile:
        from fedtune.planning.profiles import ProfileError, load_profile

        try:
            load_profile(options.profile)
        except ProfileError as err:
            raise ClientError(str(err)) from None
    if not options.insecure and not options.root_certificates:
        raise ClientError("give --root-certificates CA_FILE (the CA that signed the server's "
                          "certificate) or --insecure (traffic NOT encrypted)")
    for flag, value in (("--root-certificates", options.root_certificates),
                        ("--auth-key", options.auth_key)):
        if value and not Path(value).is_file():
            raise ClientError(f"{flag} {value}: no such file")
    return len(texts)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClientError(f"--server {address!r} must look like HOST:PORT")
    return host.strip("[]"), int(port)


def check_server(options: ClientOptions, wait: float = 30.0) -> None:
    """Reach the server's port (retrying for ``wait`` seconds: a server being restarted)
    and, with TLS, verify its certificate against the CA."""
    host, port = split_address(options.server)
    deadline = time.monotonic() + wait
    while True:
        try:
            connection = socket.create_connection((host, port), timeout=10)
            break
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ClientError(f"cannot reach the server at {options.server} (tried for "
                                  f"{wait:g} s): {err}") from None
            time.sleep(1.0)
    with connection:
        if options.insecure:
            _check_plain_http(options.server)
            return
        context = ssl.create_default_context(cafile=options.root_certificates)
        try:
            with context.wrap_socket(connection, server_hostname=host):
                pass
        except ssl.SSLError as err:
            raise ClientError(
                f"TLS with {options.server} failed: {err.reason or err} (is "
                f"{options.root_certificates} the CA that signed the server's certificate, "
                f"and is {host} among the names it is issued for?)") from None


def _get_health(address: str, ca: str = "") -> None:
    """GET the server front's /health: plain HTTP without ``ca``, else TLS verified
    against it; raises httpx.HTTPError when nothing answers."""
    import httpx

    scheme = "https" if ca else "http"
    httpx.get(f"{scheme}://{address}/health", timeout=10, verify=ca or False)


def server_answers(options: ClientOptions) -> bool:
    """Whether the server's health endpoint answers (TLS verified against the CA)."""
    import httpx

    try:
        _get_health(options.server, "" if options.insecure else options.root_certificates)
    except httpx.HTTPError:
        return False
    return True


def watch_server(options: ClientOptions, stop: threading.Event, gave_up: threading.Event,
                 answers: Callable[[ClientOptions], bool] = server_answers) -> None:
    """Set ``gave_up`` and ``stop`` once the server has not answered for
    ``options.reconnect_for`` seconds. The SuperNode retries forever (flwr 1.41's
    ``--max-wait-time`` ends its connection loop but not its process), and a client left
    waiting on a server that is gone, an SDK session above all, would never return."""
    every = min(30.0, options.reconnect_for / 3)
    down_since: float | None = None
    while not stop.wait(every):
        if answers(options):
            down_since = None
            continue
        now = time.monotonic()
        down_since = now if down_since is None else down_since
        if now - down_since >= options.reconnect_for:
            gave_up.set()
            stop.set()
            return


def _check_plain_http(address: str) -> None:
    """An insecure client of a TLS server would retry forever: ask the server's health
    endpoint in plain HTTP first."""
    import httpx

    try:
        _get_health(address)
    except httpx.HTTPError as err:
        raise ClientError(f"the server at {address} does not answer plain HTTP ({err}); it "
                          "probably uses TLS: pass --root-certificates CA_FILE instead of "
                          "--insecure") from None


def node_config(options: ClientOptions) -> str:
    """``--node-config`` (TOML values; JSON strings are valid TOML basic strings)."""
    values = {"data-path": options.data_path, "name": options.client_name,
              "profile": str(Path(options.profile).resolve()) if "/" in options.profile
              or options.profile.endswith(".toml") else options.profile}
    if options.model:
        values["model"] = options.model
    values.update(options.privacy_floor.node_config())
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _folder_name(text: str) -> str:
    """``text`` as one safe path component (a digest added when characters changed)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "_"
    if safe == text:
        return safe
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def default_state_dir(options: ClientOptions) -> Path:
    """The state folder of a client started without ``--state-dir``: persistent and
    per user, one per server and client name, so a restarted client keeps its pins
    (``$XDG_STATE_HOME/fedtune/clients/SERVER/NAME``, ``~/.local/state`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return (Path(base) / "fedtune" / "clients" / _folder_name(options.server)
            / _folder_name(options.client_name))


def prepare_state_dir(options: ClientOptions) -> Path:
    """The client's state folder, made private to its user (0700). An existing folder
    of another user, or one every user may write to (``/tmp``), is refused, not
    changed."""
    state = Path(options.state_dir) if options.state_dir else default_state_dir(options)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = state.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o002:
        raise ClientError(f"--state-dir {state} belongs to another user or is writable by "
                          "every user; give a folder of this client's own")
    os.chmod(state, 0o700)
    (state / "home").mkdir(mode=0o700, exist_ok=True)
    return state


def supernode_command(options: ClientOptions, runtime_port: int, secret_file: Path
                      ) -> list[str]:
    # --isolation process: the SuperNode never starts a ClientApp itself (Flower's would
    # install the run's FAB and run its code); fedtune's worker claims every task, with
    # the SuperExec secret of secret_file (its name only is on the command line)
    command = [flower_bin("flower-supernode"), "--superlink", options.server,
               "--host", "127.0.0.1", "--port", str(runtime_port),
               "--node-config", node_config(options), "--isolation", "process",
               "--superexec-auth-secret-file", str(secret_file)]
    if options.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", options.root_certificates]
    if options.auth_key:
        command += ["--auth-supernode-private-key", options.auth_key]
    return command


def run_pin(options: ClientOptions, state: Path) -> RunPin | None:
    """Which runs this client serves: those sealed by the server it dials (TLS only)."""
    if options.insecure:
        return None
    host, _ = split_address(options.server)
    return RunPin(options.root_certificates, host, state / PIN_FILE)


def per_message_runner(options: ClientOptions, address: str, state: Path
                       ) -> Callable[[str], str]:
    """Runs each task in a fresh ``fedtune.deploy.task`` process (same run check)."""
    host = "" if options.insecure else split_address(options.server)[0]
    command = task_command(address, options.app,
                           "" if options.insecure else options.root_certificates, host,
                           "" if options.insecure else str(state / PIN_FILE))

    def run(token: str) -> str:
        # its log goes where this client's goes; its last line of output is the status
        done = subprocess.run(command, env={**os.environ, TOKEN_VARIABLE: token},
                              stdout=subprocess.PIPE, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            log.error("the per-message ClientApp process failed (exit code %d)",
                      done.returncode)
            return "failed"
        return lines[-1]

    return run


#: what flwr's SuperNode logs when it cannot set up its connection (it exits with status
#: 1, as for every error) because the SuperLink refused to activate its node
CONNECTION_ERROR = "Exit Code: 305"
ACTIVATION_REFUSED = "Failed to activate SuperNode"


def activation_wait() -> float:
    """How long a SuperLink keeps a node online after its last heartbeat (flwr: 2 x its
    30 s interval), plus a margin: with node authentication a node is its key, and one
    still online cannot be activated again, so a client restarted within that window
    (its old SuperNode killed, or stopped while the server was down) is refused until
    then."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    return HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 15.0


class SuperNode:
    """The client's flower-supernode, started again while the SuperLink refuses to
    activate its node because the node's previous connection has not expired yet
    (:func:`activation_wait`); ``ended`` is set when it ends by itself for good."""

    retry_pause = 5.0  # seconds between two starts

    def __init__(self, command: list[str], env: dict[str, str], log: Path,
                 stop: threading.Event, say: Callable[[str], None]) -> None:
        self.command, self.env, self.log, self.stop_event, self.say = command, env, log, stop, say
        self.lock = threading.Lock()
        self.ended = threading.Event()
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as handle:
            return subprocess.Popen(self.command, stdout=handle, stderr=subprocess.STDOUT,
                                    env=self.env)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def _activation_refused(self) -> bool:
        with open(self.log, "rb") as handle:
            handle.seek(self.log_offset)
            text = handle.read().decode(errors="replace")
        return (self.process.returncode != 0 and CONNECTION_ERROR in text
                and ACTIVATION_REFUSED in text)

    def watch(self) -> None:
        """Wait for the SuperNode; start it again while its activation is refused (for
        :func:`activation_wait` at most), else set ``ended`` (unless we were asked to
        stop: a Ctrl-C reaches both) and ``stop``."""
        deadline: float | None = None
        while True:
            self.process.wait()
            if self.stop_event.is_set() or not self._activation_refused():
                break
            now = time.monotonic()
            deadline = deadline or now + activation_wait()
            if now >= deadline or self.stop_event.wait(self.retry_pause):
                break
            with self.lock:
                if self.stop_event.is_set():
                    break
                self.say("the server still holds this client's previous connection (until "
                         "its heartbeats expire, at most a minute); connecting again")
                self.process = self._start()
        if not self.stop_event.is_set():
            self.ended.set()
        self.stop_event.set()

    def stop(self) -> None:
        with self.lock:
            self.stop_event.set()
            stop_process(self.process)


def run_client(options: ClientOptions, say: Callable[[str], None] | None = None,
               stop: threading.Event | None = None, app: ClientApp | None = None) -> int:
    """Check, connect and serve until the SuperNode ends or ``stop`` is set; returns the
    number of messages served. Raises ClientError when the server refuses this client.
    ``app`` serves the messages in place of ``options.app`` (an application's own)."""
    from fedtune.deploy.worker import serve_forever

    say = say or (lambda text: None)
    texts = check_local(options)
    check_server(options, options.connect_wait)
    if app is None and options.long_lived:
        app = load_app(options.app)  # type: ignore[assignment]
    state = prepare_state_dir(options)
    secret = new_secret_file(state / SUPEREXEC_SECRET).encode()
    log = state / "supernode.log"
    port = free_port()
    env = flower_env(state / "home")
    stop = stop or threading.Event()
    supernode = SuperNode(supernode_command(options, port, state / SUPEREXEC_SECRET), env,
                          log, stop, say)
    say(f"client {options.client_name!r}: {texts} texts in {options.data}; connecting to "
        f"{options.server} ({'insecure' if options.insecure else 'TLS'}); log {log}")

    gave_up = threading.Event()  # the server stopped answering for options.reconnect_for
    if options.reconnect_for > 0:
        threading.Thread(target=watch_server, args=(options, stop, gave_up),
                         daemon=True).start()
    threading.Thread(target=supernode.watch, daemon=True).start()
    served = 0

    def count(status: str, seconds: float) -> None:
        nonlocal served
        served += 1
        say(f"message {served} done ({status}) in {seconds:.1f} s")

    pin = run_pin(options, state)
    if pin is None:
        say("insecure: this client serves any run the server's SuperLink holds (no seal "
            "can be checked without TLS)")
    address = f"127.0.0.1:{port}"
    per_message = None if options.long_lived else per_message_runner(options, address, state)
    try:
        serve_forever(address, app, stop=stop, on_task=count,  # type: ignore[arg-type]
                      pin=pin, run_task=per_message, superexec_secret=secret)
    finally:
        supernode.stop()
    if gave_up.is_set():
        raise ClientError(f"the server at {options.server} stopped answering (given up "
                          f"after --reconnect-for {options.reconnect_for:g} s)")
    # a SuperNode the server refused (a 401: it stops itself, exit 0) ends by itself too
    code = supernode.returncode
    if supernode.ended.is_set() and (code != 0 or served == 0):
        what = "did not accept this client" if served == 0 else "connection ended"
        raise ClientError(f"the server {what} (SuperNode exit code {code}):\n"
                          f"{tail(log, 8)}")
    return served
