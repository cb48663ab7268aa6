"""An admitted client that attacks the server through its replies costs the server at
most that reply (real processes on localhost, tiny model): other shapes as the first
reply of round 1, an 82-byte reply declaring a 40000 x 40000 tensor, one declaring a
tensor too large to allocate, and a claim of 10**12 examples. Each is dropped with its
reason, the run completes with the honest clients in their places, and the server's
peak memory stays within 1.5x of the same federation with an honest third client (the
session's ``honest_federation``, whose third client also dies and comes back)."""

from __future__ import annotations

import re

import pytest

from tests.deploy import harness as h

pytestmark = [pytest.mark.timeout(600), pytest.mark.e2e]

PATIENT = ["--app", "tests.deploy.hostile_app:patient"]


def _hostile(tmp) -> tuple:
    port = h.free_port()
    files = h.client_files(tmp / "data", 3)
    server = h.server(tmp, port, h.HOSTILE_SETS, ["--insecure"])
    memory = h.PeakMemory(server.process.pid)
    run_dir = h.run_dir_of(server)
    clients = [h.client(tmp, port, f, ["--insecure", *PATIENT]) for f in files[:2]]
    clients.append(h.client(tmp, port, files[2],
                            ["--insecure", "--app", "tests.deploy.hostile_app:app"]))
    try:
        code = server.wait(400)
    finally:
        peak = memory.stop()
        for c in clients:
            c.stop()
    assert code == 0, server.output()[-3000:]
    return run_dir, peak, server


@pytest.fixture(scope="module")
def hostile(background, honest_federation, tmp_path_factory):
    """The attacked federation, while the honest one runs (if it is still running)."""
    return background.submit(_hostile, tmp_path_factory.mktemp("hostile")).result()


def test_each_attack_is_dropped_with_its_reason_and_the_honest_clients_keep_their_place(
        hostile):
    run_dir, _, _ = hostile
    rounds = h.summary(run_dir)["rounds"]
    assert [r["clients_replied"] for r in rounds] == [2, 2, 2, 2]
    reasons = [" ".join(r["dropped"]) for r in rounds]
    assert "expected" in reasons[0] and "module" in reasons[0], reasons[0]
    assert re.search(r"undecodable adapter: .*40000\D+40000", reasons[1]), reasons[1]
    assert re.search(rf"undecodable adapter: .*{2**20}\D+{2**20}", reasons[2]), reasons[2]
    assert "examples" in reasons[3], reasons[3]


def test_the_server_spends_no_more_memory_than_with_an_honest_client(hostile,
                                                                    honest_federation):
    _, attacked_peak, _ = hostile
    honest = honest_federation.result()
    assert h.summary(honest.run_dir)["status"] == "completed"
    dropped = [d for r in h.summary(honest.run_dir)["rounds"] for d in r["dropped"]]
    assert all("no reply" in d or "Unavailable" in d for d in dropped), dropped  # none bad
    peak = honest.server_peak_memory
    assert attacked_peak < 1.5 * peak, (attacked_peak / 2**20, peak / 2**20)
