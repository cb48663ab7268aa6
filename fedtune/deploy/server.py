"""``fedtune server``: a Flower SuperLink plus one run of the fedtune ServerApp.

The SuperLink (Flower's own server process) listens on the loopback interface only: its
one HTTP port serves the Control API (run submission, client key registration) and the
runtime API as well as the Fleet API, and flwr's open-source Control API trusts every
caller. Clients connect to ``server.address``, where ``fedtune.deploy.front`` forwards
the Fleet routes and nothing else. The run is submitted through the loopback Control API
as a Flower app whose run config carries the whole scenario, sealed with the server's
TLS key (``fedtune.deploy.seal``), so clients need nothing but the server's address and
CA, and serve no other run. The ServerApp writes the same run directory as ``fedtune
simulate`` and a checkpoint after every round; ``--resume RUN_DIR`` starts a new
SuperLink on the same state and continues the run.

Layout of the run directory's ``flower/`` folder: ``app/pyproject.toml`` (the app that
is submitted), ``home/`` (FLWR_HOME of the SuperLink), ``state.db`` (its database, so
registered client keys survive a restart), ``superlink.log`` (the SuperLink's and the
ServerApp's output), ``loopback/`` (private to the server's user, made anew at each
start: the loopback SuperLink's certificate, the operator secret its Control API asks
for, the SuperExec secret ``AcquireTask`` asks for, the ServerApp's task token) and,
while the server runs, ``control.json`` (where ``fedtune keys`` reaches the Control API).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.config import ConfigError, Scenario, ServerSpec
from fedtune.core.files import PRIVATE_UMASK, private_folder, write_private
from fedtune.deploy.certs import Certificates, make_certificates
from fedtune.deploy.front import Front, Upstream, make_app
from fedtune.deploy.seal import seal_config
from fedtune.deploy.superlink import OPERATOR_SECRET, new_secret_file
from fedtune.runs.lifecycle import (  # shared with fedtune simulate
    Interrupted,
    check_resumable,
    load_run_scenario,
    mark_stopped,
    resumed_scenario,  # noqa: F401 - `fedtune server --resume` (cli.py) imports it here
    rounds_done,
    stop_signals,
)
from fedtune.runs.rundir import SUMMARY_FILE, new_run_dir

FLOWER_DIR = "flower"
LOG_FILE = "superlink.log"
CONTROL_FILE = "control.json"
LOOPBACK_DIR = "loopback"
#: in LOOPBACK_DIR, beside OPERATOR_SECRET (what the Control API asks for): what
#: AcquireTask asks for (flwr's SuperExec HMAC), and a ServerApp's task token per run
SUPEREXEC_SECRET = "superexec.secret"
TOKEN_FILES = "serverapp-*.token"


class DeploymentError(RuntimeError):
    """The server could not start or the run did not complete."""


class ServerStopped(Exception):
    """SIGTERM or SIGINT stopped the server; every process it started is gone and the
    checkpoint of the last completed round is where it was."""

    def __init__(self, signum: int, run_dir: Path, rounds_done: int) -> None:
        self.signum, self.run_dir, self.rounds_done = signum, run_dir, rounds_done
        super().__init__(f"stopped by {signal.Signals(signum).name} after {rounds_done} "
                         f"completed round(s); run directory {run_dir}")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process its signal ended."""
        return 128 + self.signum


@dataclass(frozen=True)
class Endpoint:
    """How tools on the server machine reach the SuperLink's Control API (loopback):
    its address and the CA of its loopback certificate; the operator secret the
    Control API asks for lies beside that CA (``fedtune.deploy.superlink``)."""

    address: str
    ca_cert: str | None

    def save(self, path: Path) -> None:
        write_private(path, json.dumps({"address": self.address, "ca_cert": self.ca_cert}))

    @classmethod
    def load(cls, path: Path) -> Endpoint:
        saved = json.loads(path.read_text())
        return cls(str(saved["address"]), saved.get("ca_cert"))


def flower_bin(name: str) -> str:
    """A Flower executable next to this Python (a venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} not found; is flwr installed in this environment?")
    return found


def flower_env(home: Path) -> dict[str, str]:
    """The environment of Flower's processes: their own FLWR_HOME, and this Python's
    scripts first on PATH (a SuperLink starts ``flower-superexec`` by name)."""
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "FLWR_HOME": str(home),
            "PATH": scripts + os.pathsep + os.environ.get("PATH", "")}


def operator_endpoint(run_dir: Path) -> Endpoint:
    """Where the running server of ``run_dir`` takes Control API calls (``fedtune keys``)."""
    path = Path(run_dir) / FLOWER_DIR / CONTROL_FILE
    if not path.is_file():
        raise ConfigError(f"no running fedtune server for {run_dir} (no {path}); start it, "
                          "or list the keys in server.auth_keys for its next start")
    return Endpoint.load(path)


def check_security(server: ServerSpec) -> None:
    """TLS certificates or an explicit insecure choice, node authentication or an
    explicit choice to go without, and files that exist."""
    if not server.insecure and not server.tls:
        raise ConfigError(
            "the server needs TLS certificates (server.ca_cert, server.cert, server.key; "
            "`fedtune certs DIR` makes test ones) or an explicit --insecure, which sends "
            "adapters and metrics unencrypted")
    if server.tls and not server.auth_keys and not server.allow_unauthenticated_clients:
        raise ConfigError(
            "server.auth_keys is not set: without node authentication anyone who can reach "
            f"{server.address} can join as a client and send updates. List the clients' "
            "public keys in server.auth_keys (`fedtune certs DIR --clients N` makes "
            "DIR/authorized_clients.pub), or set server.allow_unauthenticated_clients = "
            "true to accept any client on purpose")
    for key in ("ca_cert", "cert", "key", "auth_keys"):
        value = getattr(server, key)
        if value and not Path(value).is_file():
            raise ConfigError(f"server.{key} = {value!r}: no such file")


def app_config(scenario: Scenario, run_dir: Path, resume: bool) -> dict[str, Any]:
    """The run config: the whole scenario as flat keys (clients read it from there)."""
    return {"scenario": "", "overrides": "", "out": str(run_dir.parent),
            "run-dir": str(run_dir.resolve()), "resume": resume, **scenario.to_flat()}


def write_app(folder: Path, config: dict[str, Any]) -> Path:
    """A Flower app that is nothing but fedtune's installed ServerApp / ClientApp."""
    private_folder(folder)
    project = {
        "project": {"name": "fedtune-run", "version": "1.0.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "components": {"serverapp": "fedtune.flower.server_app:app",
                           "clientapp": "fedtune.flower.client_app:app"},
            "config": config,
        }}},
    }
    write_private(folder / "pyproject.toml", tomli_w.dumps(project))
    return folder


def superlink_command(server: ServerSpec, database: Path, port: int,
                      loopback: Certificates, private: Path) -> list[str]:
    """The SuperLink on 127.0.0.1 only, behind the operator guard
    (``fedtune.deploy.superlink``), with the loopback certificate (an insecure
    deployment too: ``insecure`` is about the clients' port). ``--isolation process``:
    it starts no SuperExec (whose ServerApp would get its token on the command line,
    and which launches any run's app); ``fedtune server`` launches the ServerApp of its
    own run itself. Only secret file names are on the command line, in ``private``
    (mode 0700)."""
    command = [sys.executable, "-m", "fedtune.deploy.superlink",
               "--operator-secret-file", str(private / OPERATOR_SECRET),
               "--host", "127.0.0.1", "--port", str(port),
               "--database", str(database), "--disable-runtime-dependency-installation",
               "--isolation", "process",
               "--superexec-auth-secret-file", str(private / SUPEREXEC_SECRET)]
    command += ["--ssl-ca-certfile", str(loopback.ca_cert), "--ssl-certfile",
                str(loopback.cert), "--ssl-keyfile", str(loopback.key)]
    if server.auth_keys:
        command.append("--enable-supernode-auth")
    return command


def loopback_folder(flower: Path) -> Path:
    """``flower/loopback``, mode 0700, with a fresh operator secret and SuperExec
    secret: made at each start, so nothing of an earlier start stays valid."""
    folder = private_folder(flower / LOOPBACK_DIR)
    for name in (OPERATOR_SECRET, SUPEREXEC_SECRET):
        new_secret_file(folder / name)
    remove_token_files(folder)
    return folder


def remove_token_files(folder: Path) -> None:
    for path in folder.glob(TOKEN_FILES):
        path.unlink(missing_ok=True)


def loopback_certificates(folder: Path) -> Certificates:
    """A fresh CA and certificate for 127.0.0.1 in the private ``folder``."""
    return make_certificates(folder, ["127.0.0.1", "localhost"])


def serverapp_command(endpoint: Endpoint, token_file: Path) -> list[str]:
    """flwr's ServerApp process for one claimed task: the token in a file, never on the
    command line (which every local user can read); exits with ``fedtune server``."""
    command = [flower_bin("flwr-serverapp"), "--runtime-api-address", endpoint.address,
               "--token-file", str(token_file), "--parent-pid", str(os.getpid())]
    if endpoint.ca_cert is None:
        return [*command, "--insecure"]
    return [*command, "--root-certificates", endpoint.ca_cert]


def claim_serverapp_task(endpoint: Endpoint, secret: bytes, run_id: int,
                         timeout: float = 120.0, poll: float = 0.1) -> str:
    """The token of ``run_id``'s ServerApp task, claimed with the SuperExec secret. A
    task of another run (none can be started without the operator secret) is claimed
    too, so that it never runs, and logged."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    from fedtune.deploy.worker import ACQUIRE_TASK

    client = RuntimeHttpClient.from_server_address(
        server_address=endpoint.address, insecure=endpoint.ca_cert is None,
        root_certificates=endpoint.ca_cert,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods={ACQUIRE_TASK})])
    request = AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP])
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    try:
        while time.monotonic() < deadline:
            try:
                response = client.AcquireTask(request)
            except httpx.HTTPError as err:  # the SuperLink busy or restarting: ask again
                last_error = err
                time.sleep(1.0)
                continue
            if response.HasField("task") and response.token:
                if response.task.run_id == run_id:
                    return str(response.token)
                print(f"fedtune server: not launching run {response.task.run_id}: not the "
                      f"run this server submitted ({run_id})", file=sys.stderr)
                continue
            time.sleep(poll)
    finally:
        client.close()
    raise DeploymentError(f"the ServerApp task of run {run_id} did not appear within "
                          f"{timeout:.0f} s" + (f" (last error: {last_error})" if last_error
                                                else ""))


def launch_serverapp(endpoint: Endpoint, private: Path, run_id: int, env: dict[str, str],
                     log: Path) -> subprocess.Popen[bytes]:
    """Claim ``run_id``'s ServerApp task and start flwr-serverapp for it."""
    token = claim_serverapp_task(endpoint, (private / SUPEREXEC_SECRET).read_bytes(),
                                 run_id)
    token_file = private / TOKEN_FILES.replace("*", str(run_id))
    token_file.unlink(missing_ok=True)
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    with open(log, "ab") as log_handle:
        process = subprocess.Popen(serverapp_command(endpoint, token_file),
                                   stdout=log_handle, stderr=subprocess.STDOUT, env=env,
                                   umask=PRIVATE_UMASK)
    threading.Thread(target=keep_task_alive, args=(endpoint, token, process),
                     name="fedtune-serverapp-heartbeat", daemon=True).start()
    return process


def keep_task_alive(endpoint: Endpoint, token: str, process: subprocess.Popen[bytes],
                    every: float = 10.0) -> None:
    """Heartbeat a claimed task while its process lives: the task expires ~30 s after
    its last heartbeat, and a ServerApp process starting on a loaded machine sends its
    first one only after its imports. Ends when the process ends (so a dead ServerApp's
    run still fails) or the task is over (its token revoked)."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    from fedtune.deploy.worker import _heartbeat

    client = RuntimeHttpClient.from_server_address(
        server_address=endpoint.address, insecure=endpoint.ca_cert is None,
        root_certificates=endpoint.ca_cert,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-serverapp"),
                      RuntimeTokenHttpInterceptor(token)])
    over = threading.Event()
    beat = _heartbeat(client, over)
    try:
        while process.poll() is None and not over.is_set():
            beat()
            try:
                process.wait(every)
            except subprocess.TimeoutExpired:
                pass
    finally:
        client.close()


def start_front(server: ServerSpec, endpoint: Endpoint, scenario: Scenario | None = None
                ) -> Front:
    """Serve the Fleet API, and only it, where clients connect: node authentication
    checked there too when on, each node's messages within ``scenario``'s reply budget."""
    from fedtune.deploy.admission import MessageBudget, NodeAuth, registered_key_bytes, reply_budget

    auth = (NodeAuth(lambda: registered_key_bytes(endpoint.address, endpoint.ca_cert))
            if server.auth_keys else None)
    budget = MessageBudget(reply_budget(scenario)) if scenario is not None else None
    app = make_app(Upstream(endpoint.address, endpoint.ca_cert), auth, budget)
    front = Front(server.address, app, certfile=server.cert or None,
                  keyfile=server.key or None)
    try:
        front.start()
    except OSError as err:
        raise DeploymentError(f"cannot serve clients on {server.address}: {err}") from None
    return front


#: ports picked for the SuperLink's own APIs lie below Linux's default ephemeral range
#: (32768-60999): a port the kernel hands out for bind(0) can be taken, before our process
#: binds it, by the source port of any outgoing connection on the machine (seen with
#: several federations on one machine: "address already in use")
PICKED_PORTS = range(20000, 32768)


def free_port() -> int:
    """A random port of ``PICKED_PORTS`` that is free now on 127.0.0.1."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(PICKED_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise DeploymentError(f"no free port in {PICKED_PORTS.start}-{PICKED_PORTS.stop - 1}")


def wait_until_healthy(process: subprocess.Popen[bytes], endpoint: Endpoint, log: Path,
                       timeout: float = 60.0) -> None:
    """Poll the SuperLink's /health until it answers; a dead process is an error that
    quotes its log (a port in use, a bad certificate)."""
    import httpx

    scheme = "http" if endpoint.ca_cert is None else "https"
    verify: Any = True if endpoint.ca_cert is None else _ssl_context(endpoint.ca_cert)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"the SuperLink exited with code {process.returncode}:\n"
                                  f"{tail(log)}")
        try:
            if httpx.get(f"{scheme}://{endpoint.address}/health", verify=verify,
                         timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise DeploymentError(f"the SuperLink did not answer within {timeout:.0f} s:\n{tail(log)}")


def _ssl_context(ca_cert: str) -> Any:
    import ssl

    return ssl.create_default_context(cafile=ca_cert)


def tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def process_tree(process: subprocess.Popen[bytes]) -> list[Any]:
    """``process`` and every process under it now (psutil handles: a later pid reuse is
    told apart by its start time)."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(process: subprocess.Popen[bytes], grace: float = 10.0,
              known: list[Any] | None = None) -> None:
    """SIGTERM ``process``, every process under it and those of ``known`` still running,
    then SIGKILL what is left after ``grace`` seconds. The SuperLink starts
    ``flower-superexec`` in a session of its own and that starts ``flwr-serverapp``:
    neither is in the SuperLink's process group (a Ctrl-C does not reach them), and
    once the SuperLink is gone they are nobody's children, so the tree is read first
    (``known``: as it was at the last poll, for a SuperLink a Ctrl-C already ended)."""
    import psutil

    tree = process_tree(process)
    tree += [p for p in known or [] if p not in tree and p.is_running()]
    for member in tree:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    if process.poll() is None:
        process.wait(5)


def stop_process(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds (the SuperLink's own children
    watch its pid and exit with it)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


RoundReport = Callable[[dict[str, Any]], None]


class RoundWatcher:
    """Reports each new round of a run directory's summary as it appears."""

    def __init__(self, run_dir: Path, report: RoundReport) -> None:
        self.path = run_dir / SUMMARY_FILE
        self.report = report
        self.seen: set[int] = set()

    def poll(self) -> dict[str, Any] | None:
        try:
            summary = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        initial = summary.get("initial") or {}
        if initial and 0 not in self.seen:
            self.seen.add(0)
            self.report({"round": 0, "eval_loss": initial.get("eval_loss")})
        for record in summary.get("rounds", []):
            if record["round"] not in self.seen:
                self.seen.add(record["round"])
                self.report(record)
        return summary


class _Serving:
    """What a serve() has started, so that a stop signal arriving anywhere (even in the
    middle of the clean-up) still ends with every process stopped."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.front: Front | None = None
        self.control_file: Path | None = None
        self.serverapp: subprocess.Popen[bytes] | None = None  # the one fedtune launched
        self.loopback: Path | None = None  # the secrets and the ServerApp's token file
        self.tree: list[Any] = []  # the SuperLink's process tree at the last poll

    def clean_up(self) -> None:
        """Idempotent: the control file gone, the front and the SuperLink's tree stopped."""
        if self.control_file is not None:
            self.control_file.unlink(missing_ok=True)
        if self.front is not None:
            self.front.stop()
            self.front = None
        if self.serverapp is not None:
            stop_tree(self.serverapp)
            self.serverapp = None
        if self.loopback is not None:
            remove_token_files(self.loopback)
        if self.process is not None:
            stop_tree(self.process, known=self.tree)
            self.process = None


def serve(scenario: Scenario | None, out_dir: str | Path | None = None,
          resume: Path | None = None, report: RoundReport | None = None,
          announce: Callable[[str], None] | None = None) -> Path:
    """Start the SuperLink, run every round (or the rest, with ``resume``: the run
    directory's scenario, or ``scenario`` from :func:`resumed_scenario`), stop it;
    returns the run directory. Raises DeploymentError when the run does not complete,
    ServerStopped after SIGTERM / SIGINT (every process it started is stopped first)."""
    serving = _Serving()
    with stop_signals():
        try:
            return _serve(scenario, out_dir, resume, report, announce, serving)
        except Interrupted as stop:
            signum = stop.signum
        finally:
            serving.clean_up()
    if serving.run_dir is None:
        raise DeploymentError(f"stopped by {signal.Signals(signum).name} before the run "
                              "directory was made")
    mark_stopped(serving.run_dir, "stopped",
                 f"the server was stopped by {signal.Signals(signum).name}")
    raise ServerStopped(signum, serving.run_dir, rounds_done(serving.run_dir))


def _serve(scenario: Scenario | None, out_dir: str | Path | None, resume: Path | None,
           report: RoundReport | None, announce: Callable[[str], None] | None,
           serving: _Serving) -> Path:
    from fedtune.deploy.control import ControlSession
    from fedtune.planning.client_settings import check_ranks_fit_model, client_settings

    say = announce or (lambda text: None)
    if resume is not None:
        resume = Path(resume)
        scenario = scenario or load_run_scenario(resume)
        check_resumable(scenario)
    assert scenario is not None
    check_security(scenario.server)
    check_ranks_fit_model(scenario, client_settings(scenario))
    run_dir = private_folder(resume) if resume else \
        new_run_dir(out_dir or scenario.run.out_dir, scenario.run.name)
    serving.run_dir = run_dir
    flower = private_folder(run_dir / FLOWER_DIR)
    private_folder(flower / "home")
    config = app_config(scenario, run_dir, resume is not None)
    if scenario.server.tls:
        config = seal_config(config, scenario.server.cert, scenario.server.key)
    app = write_app(flower / "app", config)
    log = flower / LOG_FILE
    private = serving.loopback = loopback_folder(flower)
    loopback = loopback_certificates(private)
    endpoint = Endpoint(f"127.0.0.1:{free_port()}", str(loopback.ca_cert))
    env = flower_env(flower / "home")
    serving.control_file = flower / CONTROL_FILE
    with open(log, "ab") as log_handle:
        os.fchmod(log_handle.fileno(), 0o600)
        # the umask reaches the SuperLink's children too: state.db, the ServerApp's run
        # directory files and checkpoints are the server's user's alone
        process = serving.process = subprocess.Popen(
            superlink_command(scenario.server, flower / "state.db",
                              int(endpoint.address.rpartition(":")[2]), loopback, private),
            stdout=log_handle, stderr=subprocess.STDOUT, env=env, umask=PRIVATE_UMASK)
    wait_until_healthy(process, endpoint, log)
    serving.front = start_front(scenario.server, endpoint, scenario)
    control = _with_home(env, lambda: ControlSession(endpoint.address, endpoint.ca_cert))
    try:
        if scenario.server.auth_keys:
            control.register_node_keys(Path(scenario.server.auth_keys))
        endpoint.save(flower / CONTROL_FILE)
        security = ("insecure: traffic is NOT encrypted" if scenario.server.insecure
                    else "TLS" + (", node authentication" if scenario.server.auth_keys
                                  else ", ANY client may join"))
        say(f"clients connect to {scenario.server.address} ({security}); waiting for "
            f"{scenario.data.num_clients} clients; run directory {run_dir}")
        run_id = _with_home(env, lambda: control.submit_run(app, {}))
        serving.serverapp = launch_serverapp(endpoint, private, run_id, env, log)
        watcher = RoundWatcher(run_dir, report or (lambda record: None))

        def check_alive() -> None:
            watcher.poll()
            serving.tree = process_tree(process)
            if process.poll() is not None:
                raise DeploymentError(f"the SuperLink exited with code {process.returncode}:"
                                      f"\n{tail(log)}")

        status = control.wait_for_run(run_id, on_poll=check_alive)
    finally:
        control.close()
    summary = watcher.poll() or {}
    serving.clean_up()
    if status[1] != "completed" or summary.get("status") != "completed":
        raise DeploymentError(f"run {run_id} ended {status[0]}:{status[1]} {status[2]} "
                              f"(summary status {summary.get('status')!r}); see {log} and "
                              f"{run_dir}")
    return run_dir


def _with_home(env: dict[str, str], call: Callable[[], Any]) -> Any:
    """Flower's CLI helpers read FLWR_HOME (auth tokens, config): point it at the run's."""
    saved = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = env["FLWR_HOME"]
    try:
        return call()
    finally:
        if saved is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = saved
