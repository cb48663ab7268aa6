"""Another local user on the server machine, against fedtune's loopback SuperLink alone
(real processes, a few seconds): the Control API and the ServerApp's AcquireTask refuse
it while the operator's run waits, and no secret is on a command line. The same user
against a running federation's SuperNodes is in test_security.py."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy import local_attacker as attacker

pytestmark = [pytest.mark.timeout(300)]


def outsider_fab(folder: Path, marker: Path) -> bytes:
    """A Flower app whose ServerApp writes ``marker`` when it is imported."""
    from flwr.cli.build import build_fab_from_disk

    from tests.deploy.test_security import _outsider_app

    return build_fab_from_disk(_outsider_app(folder, marker).resolve())


def test_the_guard_opens_only_the_fleet_and_runtime_routes_and_health():
    from fedtune.deploy.superlink import is_open

    for path in ("/health", "/v1/fleet/pull-messages", "/v1/runtime/acquire-task"):
        assert is_open(path)
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/docs",
                 "/openapi.json", "/v1/fleet/../control/start-run",
                 "/v1/fleet/%2e%2e/control/start-run", "/healthz", "/v1/fleetx/a"):
        assert not is_open(path), path


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """fedtune's SuperLink as ``fedtune server`` starts it, a sealed run submitted by the
    operator and its ServerApp task left pending while nobody attacks for 3 s; then the
    operator claims that task."""
    if attacker.can_drop_privileges() is not None:
        pytest.skip(attacker.can_drop_privileges())
    from fedtune.config import ServerSpec, build_scenario
    from fedtune.deploy.certs import make_certificates
    from fedtune.deploy.control import run_status, submit_run
    from fedtune.deploy.seal import seal_config
    from fedtune.deploy.server import (
        SUPEREXEC_SECRET,
        DeploymentError,
        Endpoint,
        app_config,
        claim_serverapp_task,
        flower_env,
        free_port,
        loopback_certificates,
        loopback_folder,
        stop_process,
        superlink_command,
        wait_until_healthy,
        write_app,
    )

    tmp = tmp_path_factory.mktemp("local-users")
    flower = tmp / "flower"
    (flower / "home").mkdir(parents=True)
    private = loopback_folder(flower)
    loopback = loopback_certificates(private)
    port = free_port()
    endpoint = Endpoint(f"127.0.0.1:{port}", str(loopback.ca_cert))
    log = flower / "superlink.log"
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            superlink_command(ServerSpec(insecure=True), flower / "state.db", port,
                              loopback, private),
            stdout=handle, stderr=subprocess.STDOUT, env=flower_env(flower / "home"))
    try:
        wait_until_healthy(process, endpoint, log)
        certs = make_certificates(tmp / "certs")
        sealed = seal_config(app_config(build_scenario({}), tmp / "run", False),
                             certs.cert, certs.key)
        run_id = submit_run(endpoint.address, write_app(tmp / "app", sealed), {},
                            endpoint.ca_cert)
        fab = outsider_fab(tmp / "outsider", tmp / "outsider-ran.txt")
        as_root = attacker.try_control(endpoint.address, fab)  # root, without the secret
        attacker.warm_up()
        result = attacker.as_another_user(attacker.attack_server, [process.pid], fab, 3.0)
        status_after = run_status(endpoint.address, run_id, endpoint.ca_cert)
        from flwr.proto.control_pb2 import ListRunsRequest

        from fedtune.deploy.control import _client

        client = _client(endpoint.address, endpoint.ca_cert)
        runs = sorted(client.ListRuns(ListRunsRequest()).run_dict)
        client.close()
        try:
            token = claim_serverapp_task(endpoint,
                                         (private / SUPEREXEC_SECRET).read_bytes(), run_id,
                                         timeout=30)
        except DeploymentError:
            token = None  # someone else claimed it
    finally:
        stop_process(process)
    secrets = [p.read_text() for p in private.glob("*.secret")]
    return dict(result=result, as_root=as_root, endpoint=endpoint, run_id=run_id,
                runs=runs, token=token, status=status_after, secrets=secrets,
                marker=tmp / "outsider-ran.txt", log=log)


@pytest.mark.e2e
def test_the_attacker_is_another_user_and_reaches_the_superlink(attacked):
    result = attacked["result"]
    assert "crashed" not in result, result
    assert result["uid"] == attacker.NOBODY
    address = attacked["endpoint"].address
    assert result["superlinks"] == [address]  # found in the process table
    assert result["acquire"][address]["health"] == 200  # reachable: only the secret lacks


@pytest.mark.e2e
def test_another_user_cannot_start_a_run_list_runs_or_register_a_key(attacked):
    address = attacked["endpoint"].address
    for tried in (attacked["result"]["control"][address], attacked["as_root"]):
        assert tried == {"start_run": {"refused": 403}, "list_runs": {"refused": 403},
                         "register_node": {"refused": 403}}, tried
    assert attacked["runs"] == [attacked["run_id"]]  # no run of the attacker exists
    assert not attacked["marker"].exists()
    assert "refused POST /v1/control/start-run" in attacked["log"].read_text()


@pytest.mark.e2e
def test_another_user_cannot_acquire_the_pending_serverapp_task(attacked):
    seen = attacked["result"]["acquire"][attacked["endpoint"].address]
    assert seen["tokens"] == []
    assert "ok" not in seen["answers"] and sum(seen["answers"].values()) > 10, seen
    assert attacked["status"][0] == "pending"  # the task waited the whole attack...
    assert attacked["token"]  # ...and the operator, with the SuperExec secret, got it


@pytest.mark.e2e
def test_no_secret_or_token_on_any_command_line(attacked):
    lines = [" ".join(line) for line in attacked["result"]["command_lines"]]
    assert lines, "the attacker saw no command line"
    for secret in [*attacked["secrets"], attacked["token"] or "(no token)"]:
        assert all(secret not in line for line in lines)
    assert all("--token " not in line for line in lines)


@pytest.fixture(scope="module")
def supernode(tmp_path_factory):
    """A SuperNode as ``fedtune client`` starts it (no server needed for its runtime API):
    nobody asks AcquireTask for 3 s, then the worker's own signed client does."""
    if attacker.can_drop_privileges() is not None:
        pytest.skip(attacker.can_drop_privileges())
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    from fedtune.deploy.client import (
        SUPEREXEC_SECRET,
        ClientOptions,
        prepare_state_dir,
        supernode_command,
    )
    from fedtune.deploy.server import flower_env, free_port, stop_process
    from fedtune.deploy.superlink import new_secret_file
    from fedtune.deploy.worker import ACQUIRE_TASK

    tmp = tmp_path_factory.mktemp("supernode")
    options = ClientOptions(server="127.0.0.1:1", data=str(tmp / "x.txt"), insecure=True,
                            state_dir=str(tmp / "state"))
    state = prepare_state_dir(options)
    secret = new_secret_file(state / SUPEREXEC_SECRET)
    port = free_port()
    with open(tmp / "supernode.log", "wb") as handle:
        process = subprocess.Popen(supernode_command(options, port, state / SUPEREXEC_SECRET),
                                   stdout=handle, stderr=subprocess.STDOUT,
                                   env=flower_env(state / "home"))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        attacker.warm_up()
        result = attacker.as_another_user(
            attacker.try_acquire, {f"127.0.0.1:{port}"}, TaskType.CLIENT_APP, 3.0, 0.02)
        worker = RuntimeHttpClient.from_server_address(
            server_address=f"127.0.0.1:{port}", insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          SuperExecAuthHttpInterceptor(master_secret=secret.encode(),
                                                       protected_methods={ACQUIRE_TASK})])
        worker.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        worker.close()
        lines = attacker.as_another_user(attacker.command_lines, [process.pid])
    finally:
        stop_process(process)
    return dict(seen=result[f"127.0.0.1:{port}"], lines=lines, secret=secret)


@pytest.mark.e2e
def test_another_user_cannot_acquire_a_task_of_the_supernode(supernode):
    seen = supernode["seen"]
    assert seen["health"] == 200 and seen["tokens"] == []  # reached it; got nothing
    assert set(seen["answers"]) == {"401"} and seen["answers"]["401"] > 10, seen
    # (the worker, signing with the secret, was answered: no exception above)
    assert supernode["secret"] not in " ".join(" ".join(line) for line in supernode["lines"])
