"""An admitted client that attacks the server through its replies costs the server at
most that reply (real processes on localhost, tiny model): other shapes as the first
reply of round 1, an 82-byte reply declaring a 40000 x 40000 tensor, one declaring a
tensor too large to allocate, and a claim of 10**12 examples. Each is dropped with its
reason, the run completes with the honest clients in their places, and the server's
peak memory stays within 1.5x of the same federation with an honest third client."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.deploy import harness as h

pytestmark = [pytest.mark.timeout(600), pytest.mark.e2e]

SETS = ["data.num_clients=3", "federation.min_clients=2", "run.rounds=4",
        "federation.round_timeout=90", "federation.max_update_norm=1000"]
PATIENT = ["--app", "tests.deploy.hostile_app:patient"]


class PeakMemory:
    """Peak resident memory of a process and all its descendants (the SuperLink, its
    SuperExec and the ServerApp process), sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self.done = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.2):
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in tree:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self.done.set()
        self.thread.join(5)
        return self.peak


def _federation(tmp, third: list[str]) -> tuple:
    port = h.free_port()
    files = h.client_files(tmp / "data", 3)
    server = h.server(tmp, port, SETS, ["--insecure"])
    memory = PeakMemory(server.process.pid)
    run_dir = h.run_dir_of(server)
    clients = [h.client(tmp, port, f, ["--insecure", *PATIENT]) for f in files[:2]]
    clients.append(h.client(tmp, port, files[2], ["--insecure", *third]))
    try:
        code = server.wait(400)
    finally:
        peak = memory.stop()
        for c in clients:
            c.stop()
    assert code == 0, server.output()[-3000:]
    return run_dir, peak, server


@pytest.fixture(scope="module")
def federations(tmp_path_factory):
    """The attacked federation and the honest one, side by side (each mostly waits on
    Flower's polling; each server's memory is its own process tree's)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {"hostile": pool.submit(_federation, tmp_path_factory.mktemp("hostile"),
                                      ["--app", "tests.deploy.hostile_app:app"]),
               "honest": pool.submit(_federation, tmp_path_factory.mktemp("honest"), PATIENT)}


@pytest.fixture(scope="module")
def hostile(federations):
    return federations["hostile"].result()


@pytest.fixture(scope="module")
def honest(federations):
    return federations["honest"].result()


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


def test_the_server_spends_no_more_memory_than_with_an_honest_client(hostile, honest):
    _, attacked_peak, _ = hostile
    honest_dir, honest_peak, _ = honest
    assert h.summary(honest_dir)["status"] == "completed"
    assert [r["clients_replied"] for r in h.summary(honest_dir)["rounds"]] == [3, 3, 3, 3]
    assert attacked_peak < 1.5 * honest_peak, (attacked_peak / 2**20, honest_peak / 2**20)
