"""`fedtune server` and `fedtune client` as real processes on localhost (tiny model):
a federation that survives a server that is killed and restarted (and ends with the
adapter of the same federation run without processes, bit for bit), rejects a malformed
reply, and survives a client that dies and comes back (the session's
``honest_federation``, which test_hostile_client reads too). TLS with node authentication, and
the clients it refuses, are in test_security.py (the attacked federation)."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from tests.deploy import harness as h

pytestmark = [pytest.mark.timeout(600), pytest.mark.e2e]

# 3 honest clients and one that sends NaN factors; everyone is sampled every round
FOUR = ["data.num_clients=4", "federation.min_clients=2", "run.rounds=2",
        "federation.round_timeout=90", "federation.max_update_norm=1000"]
EVIL = ["--app", "tests.deploy.evil_app:app", "--name", "mallory"]


def _federation(tmp, port, files, insecure=True):
    flag = ["--insecure"] if insecure else []
    clients = [h.client(tmp, port, f, flag) for f in files]
    clients.append(h.client(tmp, port, files[0], [*flag, *EVIL], name="mallory"))
    return clients


def _killed_and_resumed(tmp):
    """Three clients and a malicious one, two rounds; the server is killed after round 1
    and resumed."""
    port = h.free_port()
    files = h.client_files(tmp / "data", 3)
    server = h.server(tmp, port, FOUR, ["--insecure"])
    clients, resumed = [], None
    try:
        run_dir = h.run_dir_of(server)
        clients = _federation(tmp, port, files)
        h.wait_for_round(run_dir, 1, 240)
        # the round's record is written just before its checkpoint: the ServerApp is
        # killed with the server now (it used to outlive it, detached), so wait for both
        deadline = time.monotonic() + 60
        while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        server.kill()  # the server machine dies: SuperLink, ServerApp and all
        status = h.summary(run_dir)["status"]
        resumed = h.resume(tmp, run_dir)
        assert resumed.wait(300) == 0, resumed.output()[-3000:]
    finally:
        for c in [*clients, server, *([resumed] if resumed else [])]:
            c.stop()
    return tmp, run_dir, status, resumed, files


#: the federations each test reads, in the order the tests read them
NEEDS_RESUMED = {"test_three_clients_two_rounds_give_an_adapter_peft_loads",
                 "test_malformed_reply_is_rejected_and_the_server_goes_on",
                 "test_server_killed_after_round_1_resumes_to_the_same_adapter"}


@pytest.fixture(scope="module")
def federations(request, background, tmp_path_factory):
    """The federations the selected tests of this module read, started together (each
    mostly waits on Flower's polling, so they overlap well); a test waits only for its
    own."""
    selected = {i.originalname for i in request.session.items if i.module is request.module}
    started = {}
    if selected & NEEDS_RESUMED:
        started["resumed"] = background.submit(_killed_and_resumed,
                                               tmp_path_factory.mktemp("resumed"))
    if "test_a_client_killed_in_round_2_does_not_stop_the_run_and_it_rejoins" in selected:
        started["client_killed"] = request.getfixturevalue("honest_federation")
    return started


@pytest.fixture(scope="module")
def resumed_run(federations):
    return federations["resumed"].result()


def test_three_clients_two_rounds_give_an_adapter_peft_loads(resumed_run):
    from peft import PeftModel

    from fedtune.model.loading import ModelSpec, load_base_model

    _, run_dir, _, resumed, _ = resumed_run
    summary = h.summary(run_dir)
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [r["clients_replied"] for r in summary["rounds"]] == [3, 3]
    assert "round 2/2" in resumed.output()
    base, _ = load_base_model(ModelSpec(source="tiny", quantization="none", device="cpu"))
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert any(n for n, _ in model.named_parameters() if "lora_A" in n)


def test_malformed_reply_is_rejected_and_the_server_goes_on(resumed_run):
    _, run_dir, _, _, _ = resumed_run
    for record in h.summary(run_dir)["rounds"]:
        assert len(record["dropped"]) == 1, record["dropped"]
        assert "non-finite values" in record["dropped"][0]


def test_server_killed_after_round_1_resumes_to_the_same_adapter(resumed_run):
    """The reference is the same federation (scenario, client names, data, the malicious
    client) on the in-process Grid: one uninterrupted run of the same round loop."""
    from tests.deploy.evil_app import poisoned

    tmp, run_dir, status_when_killed, resumed, files = resumed_run
    assert status_when_killed == "running"
    summary = h.summary(run_dir)
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert "resuming" in resumed.output()
    clients = [(f.stem, f) for f in files] + [("mallory", files[0])]
    reference = h.in_process_run(run_dir, clients, tmp / "reference", {"mallory": poisoned})
    assert [r["eval_loss"] for r in summary["rounds"]] == \
        [r["eval_loss"] for r in h.summary(reference)["rounds"]]
    a = load_file(reference / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_client_killed_in_round_2_does_not_stop_the_run_and_it_rejoins(federations):
    run_dir, _, restarted = federations["client_killed"].result()
    rounds = h.summary(run_dir)["rounds"]
    assert [r["clients_replied"] for r in rounds] == [3, 2, 3, 3]
    assert rounds[1]["stragglers"] + len(rounds[1]["dropped"]) >= 1
    assert any("no reply" in d or "Unavailable" in d for d in rounds[1]["dropped"])
    assert "message" in restarted.output()  # the restarted client served round 3
