"""SecAgg+ with distributed DP in a real-process federation (``fedtune server`` and four
``fedtune client`` processes on localhost, tiny model), the fourth client malicious
(``secagg_hostile_app``): round 1 it shifts its masked vector by 2^31, round 2 it sends
a junk ciphertext, round 3 a junk ciphertext and a false claim that leaves two honest
clients. (a) the shift is caught by the range check, (b) the round left with two
releases nothing of theirs, (c) the run completes, the bad client dropped in round 2
and the three honest clients' sum released; every round is charged."""

from __future__ import annotations

import pytest

from tests.deploy import harness as h

pytestmark = [pytest.mark.timeout(600), pytest.mark.e2e]

SETS = ["data.num_clients=4", "federation.min_clients=3", "run.rounds=3",
        "federation.round_timeout=90", "privacy.secure_aggregation=true",
        "federation.aggregator='ffa'", "privacy.mode='distributed'",
        "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.05", "train.steps=2"]
HOSTILE = ["--app", "tests.deploy.secagg_hostile_app:app"]


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secagg-hostile")
    port = h.free_port()
    files = h.client_files(tmp / "data", 4)
    server = h.server(tmp, port, SETS, ["--insecure"])
    clients = []
    try:
        run_dir = h.run_dir_of(server)
        clients = [h.client(tmp, port, f, ["--insecure"]) for f in files[:3]]
        clients.append(h.client(tmp, port, files[3], ["--insecure", *HOSTILE]))
        code = server.wait(500)
    finally:
        for c in [*clients, server]:
            c.stop()
    assert code == 0, server.output()[-3000:]
    return run_dir, server


def test_the_run_completes_with_the_bad_client_dropped(attacked):
    run_dir, _ = attacked
    summary = h.summary(run_dir)
    assert summary["status"] == "completed"
    trained = [r for r in summary["rounds"] if r["round"] >= 1]
    assert [r["clients_replied"] for r in trained] == [0, 3, 0]
    assert [r.get("secagg_failed", 0) for r in trained] == [1, 0, 1]
    assert trained[1]["secagg_dropped"] == 1
    assert summary["privacy"]["rounds_released"] == 3  # failed rounds are charged too


def test_the_shift_is_caught_and_two_survivors_release_nothing(attacked):
    """Round 1 failed at the range check (after unmasking), round 3 because two were
    left after the open stage; neither released the honest clients' sum, and the
    failed rounds' records name no client."""
    run_dir, _ = attacked
    trained = [r for r in h.summary(run_dir)["rounds"] if r["round"] >= 1]
    assert [r.get("secagg_failure") for r in trained] == ["range check", None,
                                                         "too few after open"]
