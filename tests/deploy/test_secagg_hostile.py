"""SecAgg+ with distributed DP in a real-process federation (``fedtune server`` and four
``fedtune client`` processes on localhost, tiny model), the fourth client malicious
(``secagg_hostile_app``): round 1 it shifts its masked vector by 2^31, round 2 it sends
a junk ciphertext, round 3 a junk ciphertext and a false claim that leaves two honest
clients, round 4 junk shares at unmask. (a) the shift is caught by the range check,
(b) the round left with two releases nothing of theirs, (c) the run completes, the bad
client dropped in round 2 (the three honest clients' sum released) and set aside at
unmask in round 4 (its shares match no digest; the round is released); every round is
charged. The same federation's run directory is grepped for names and the cohort."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy import harness as h

pytestmark = [pytest.mark.timeout(600), pytest.mark.e2e]

SETS = ["data.num_clients=4", "federation.min_clients=3", "run.rounds=4",
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
    assert [r["clients_replied"] for r in trained] == [0, 3, 0, 4]
    assert [r.get("secagg_failed", 0) for r in trained] == [1, 0, 1, 0]
    assert trained[1]["secagg_dropped"] == 1
    assert trained[3]["secagg_dropped"] == 1  # set aside at unmask, its vector in the sum
    assert summary["privacy"]["rounds_released"] == 4  # failed rounds are charged too


def test_the_shift_is_caught_and_two_survivors_release_nothing(attacked):
    """Round 1 failed at the range check (after unmasking), round 3 because two were
    left after the open stage; neither released the honest clients' sum, and the
    failed rounds' records name no client."""
    run_dir, _ = attacked
    trained = [r for r in h.summary(run_dir)["rounds"] if r["round"] >= 1]
    assert [r.get("secagg_failure") for r in trained] == ["range check", None,
                                                         "too few after open", None]


#: the only lines of the run directory that may name a node: flwr's when it joins or
#: leaves (and fedtune's when a client comes back as another node), never per message
NODE_LINES = ("[Fleet.RegisterNode]", "[Fleet.ActivateNode]", "[Fleet.DeactivateNode]",
              "[Fleet.UnregisterNode]", "rejoined as node")


def _node_ids(run_dir: Path) -> list[int]:
    """The nodes of the run, as flwr logs them (unsigned 64 bits; sqlite keeps them signed)."""
    import sqlite3

    database = run_dir / "flower" / "state.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return [int(n) % 2**64 for (n,) in connection.execute("SELECT node_id FROM node")]


def check_secret_cohort(run_dir: Path, logs: list[Path], names: list[str]) -> None:
    """No client name in any file of the run directory (Flower's log and database
    included) or in the server's own log; no line naming a node but those of its joining
    (Flower's per-message lines would say which nodes each round sampled); and nothing
    left of the messages in Flower's database, which keeps the nodes only."""
    import sqlite3

    files = [f for f in run_dir.rglob("*") if f.is_file()] + logs
    assert any(f.name == "superlink.log" for f in files), files
    for f in files:
        data = f.read_bytes()
        for name in names:
            assert name.encode() not in data, f"{name!r} in {f}"
    nodes = [str(n) for n in _node_ids(run_dir)]
    assert len(nodes) >= 3, nodes
    for f in files:
        if f.suffix not in (".log", ".jsonl", ".json", ".html", ".toml"):
            continue
        for line in f.read_text(errors="replace").splitlines():
            if any(n in line for n in nodes):
                assert any(m in line for m in NODE_LINES), f"{f}: {line}"
    database = run_dir / "flower" / "state.db"
    wal = database.with_name("state.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0, wal.stat().st_size
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        assert connection.execute("PRAGMA freelist_count").fetchone()[0] == 0
        for table in ("message", "message_ins", "message_res", "objects"):
            assert connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0


def test_no_file_of_the_run_names_a_client_or_the_cohort(attacked):
    """Under distributed DP + SecAgg, grep every file of the server's run directory and
    the server's log for every client's name and for the nodes' ids."""
    run_dir, server = attacked
    check_secret_cohort(run_dir, [server.log], [f"client{i}" for i in range(4)])
