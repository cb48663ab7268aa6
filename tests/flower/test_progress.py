"""Progress within a round: the loop reports each reply as it arrives (clients finished /
sampled), and ``fedtune simulate`` shows it at most about once a second."""

from collections import defaultdict

from fedtune.cli import reply_line, throttled
from fedtune.config import load_scenario
from fedtune.flower.client_app import make_client_app
from fedtune.flower.inprocess_grid import InProcessGrid
from fedtune.flower.polling import exchange
from fedtune.flower.rounds import ReplyProgress
from fedtune.flower.server_app import run_federation
from fedtune.runs.rundir import new_run_dir


def test_a_tiny_run_reports_increasing_counts_ending_at_every_sampled_client(tmp_path):
    scenario = load_scenario("tiny", ["run.rounds=2", "federation.clients_per_round=3",
                                      "train.steps=2"])
    seen: list[ReplyProgress] = []
    with InProcessGrid(make_client_app(scenario), scenario.data.num_clients) as grid:
        run_federation(grid, scenario, new_run_dir(tmp_path, "progress"),
                       on_replies=seen.append)
    phases = defaultdict(list)
    for progress in seen:
        phases[(progress.round, progress.phase)].append(progress)
    assert set(phases) == {(0, "evaluate"), (1, "train"), (1, "evaluate"), (2, "train"),
                           (2, "evaluate")}
    for (_, phase), reports in phases.items():
        sampled = reports[0].sampled
        assert sampled == (3 if phase == "train" else 4)
        assert all(r.sampled == sampled for r in reports)
        counts = [r.finished for r in reports]
        assert counts[0] == 0 and counts[-1] == sampled
        assert all(a < b for a, b in zip(counts, counts[1:], strict=False)), counts


class _SlowGrid:
    """Replies to one message per pull, so the exchange sees them one by one."""

    def __init__(self) -> None:
        self.queued: list[str] = []

    def push_messages(self, messages):
        self.queued = [f"id{i}" for i, _ in enumerate(messages)]
        return list(self.queued)

    def pull_messages(self, ids):
        if not self.queued:
            return []
        reply = type("Reply", (), {})()
        reply.metadata = type("Meta", (), {"reply_to_message_id": self.queued.pop(0)})()
        return [reply]


def test_exchange_reports_after_each_batch_and_stops_at_the_deadline():
    reports = []
    replies = exchange(_SlowGrid(), [object()] * 3, timeout=30,
                       report=lambda finished, sampled: reports.append((finished, sampled)))
    assert len(replies) == 3 and reports == [(0, 3), (1, 3), (2, 3), (3, 3)]
    stuck = _SlowGrid()
    stuck.pull_messages = lambda ids: []
    assert exchange(stuck, [object()] * 2, timeout=0.2) == []


def test_the_cli_shows_a_line_at_most_once_a_second_and_always_the_last():
    now = [0.0]
    shown = []
    show = throttled(shown.append, every=1.0, clock=lambda: now[0])
    for finished, at in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 1.2), (4, 1.5), (5, 1.6)]:
        now[0] = at
        show(ReplyProgress(2, "train", finished, 5))
    assert [p.finished for p in shown] == [0, 3, 5]
    assert reply_line(shown[1], 4) == "round 2/4: 3/5 clients finished training"
    assert "finished evaluating" in reply_line(ReplyProgress(0, "evaluate", 1, 4), 4)
