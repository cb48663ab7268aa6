"""One client cannot set the federation's held-out loss: an evaluate reply's token count
(its weight in the round's loss) is bounded by what an honest client can hold, and its
loss is a finite cross-entropy >= 0. Whole rounds on the in-process Grid with the real
strategy and ClientApp; one client's evaluate replies are rewritten as an attacker
would send them, and the round's loss must be the honest clients' own."""

import json
import logging

import pytest
from flwr.app import MetricRecord

from fedtune.config import load_scenario
from fedtune.flower import messages as keys
from fedtune.flower import replies
from fedtune.flower.client_app import make_client_app
from fedtune.flower.inprocess_grid import InProcessGrid
from fedtune.flower.server_app import run_federation

SETS = ["run.rounds=1", "data.num_clients=3", "federation.clients_per_round=3",
        "federation.min_clients=2", "data.max_eval_sequences=8", "train.steps=2"]


def _federate(tmp_path, lie: dict, caplog):
    """Partition 1 answers every evaluation with ``lie``; the others honestly."""
    scenario = load_scenario("tiny", SETS)
    app = make_client_app(scenario)
    honest: list[tuple[int, float, int]] = []

    def client(message, context):
        reply = app(message, context)
        if message.metadata.message_type != "evaluate" or reply.has_error():
            return reply
        metrics = reply.content.metric_records[keys.METRICS]
        partition = int(context.node_config["partition-id"])
        if partition == 1:
            reply.content[keys.METRICS] = MetricRecord({**dict(metrics), **lie})
        else:
            honest.append((int(message.content.config_records["config"][keys.ROUND]),
                           float(metrics[keys.EVAL_LOSS]), int(metrics[keys.EVAL_TOKENS])))
        return reply

    with caplog.at_level(logging.WARNING, logger="fedtune"), \
            InProcessGrid(client, 3) as grid:
        run_federation(grid, scenario, tmp_path / "run")
    return json.loads((tmp_path / "run" / "summary.json").read_text()), honest


def _honest_mean(honest, round_number):
    pairs = [(loss, tokens) for r, loss, tokens in honest if r == round_number]
    assert len(pairs) == 2
    return sum(loss * t for loss, t in pairs) / sum(t for _, t in pairs)


@pytest.mark.parametrize(("lie", "reason"), [
    ({keys.EVAL_LOSS: 0.01, keys.EVAL_TOKENS: 10**15}, "eval-tokens 1000000000000000 exceeds"),
    ({keys.EVAL_LOSS: -50.0, keys.EVAL_TOKENS: 200}, "eval-loss must be a finite number >= 0"),
])
def test_a_lying_evaluation_is_dropped_and_the_loss_is_the_honest_clients(tmp_path, caplog,
                                                                           lie, reason):
    summary, honest = _federate(tmp_path, lie, caplog)
    assert summary["initial"]["eval_loss"] == pytest.approx(_honest_mean(honest, 0), rel=1e-12)
    assert summary["rounds"][0]["eval_loss"] == pytest.approx(_honest_mean(honest, 1),
                                                              rel=1e-12)
    assert summary["rounds"][0]["eval_loss"] > 1.0  # not the liar's 0.01 (or below 0)
    assert any(reason in r.getMessage() for r in caplog.records), caplog.text


def test_the_token_cap_is_what_an_honest_client_can_hold():
    # data.max_eval_sequences: every client cuts its held-out blocks there
    assert replies.eval_token_cap(8, 100_000, 0.1, 32) == 8 * 32
    # else the example cap, scaled up when the held-out part is the larger one
    assert replies.eval_token_cap(0, 1000, 0.1, 32) == 1000 * 32
    assert replies.eval_token_cap(0, 1000, 0.75, 32) == 3000 * 32
    assert replies.eval_token_cap(0, 0, 0.1, 32) == 0  # no bound configured


def test_an_honest_client_at_the_cap_is_kept():
    from flwr.app import RecordDict

    content = RecordDict({keys.METRICS: MetricRecord({keys.EVAL_LOSS: 3.0,
                                                      keys.EVAL_TOKENS: 256})})
    assert replies.eval_numbers(content, 256)[:2] == (3.0, 256)
    with pytest.raises(ValueError, match="eval-tokens 257 exceeds the 256"):
        replies.eval_numbers(RecordDict({keys.METRICS: MetricRecord(
            {keys.EVAL_LOSS: 3.0, keys.EVAL_TOKENS: 257})}), 256)
