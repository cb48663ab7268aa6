"""The round loop of a fedtune run (the ServerApp's, not the strategy's).

Flower's ``Strategy.start`` runs configure -> ``send_and_receive`` -> aggregate for a
fixed number of rounds, and fedtune's strategy keeps that contract, but the loop cannot
be Flower's:

* every round looks for nodes that (re)joined since the last (discovery, names), and
  the evaluation before round 1 is a round 0 the strategy configures like the others;
* each round's record holds what only the server measured in that round (bytes each
  way, replies dropped and why, stragglers, simulated faults, refused name claims,
  seconds per phase), written and checkpointed as soon as the round ends, so a crash
  loses at most the round in progress;
* a run resumes from a checkpoint at its next round, and stops early, with the reason,
  before a round the privacy budget cannot pay for;
* ``send_and_receive`` says nothing until the last reply or the deadline, and a round
  of real clients takes minutes: :func:`~fedtune.flower.polling.exchange` pushes and
  pulls the messages itself (as ``send_and_receive`` does inside) and reports each reply
  as it arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.serverapp import Grid

from fedtune.core.codec import scale_folded_state_dict
from fedtune.flower import messages as keys
from fedtune.flower import secagg
from fedtune.flower.polling import exchange
from fedtune.flower.population import RoundFailedError
from fedtune.flower.round_stats import client_time_breakdown
from fedtune.flower.strategy import BudgetStop, FedtuneStrategy

log = logging.getLogger("fedtune")

RoundCallback = Callable[[dict[str, Any]], None]


class ReplyProgress(NamedTuple):
    """How far a phase of a round is: ``finished`` of the ``sampled`` clients sent work
    have replied (with a result or an error)."""

    round: int
    phase: str  # "train" | "evaluate"
    finished: int
    sampled: int


OnReplies = Callable[[ReplyProgress], None]


def _reporter(on_replies: OnReplies | None, server_round: int, phase: str
              ) -> Callable[[int, int], None]:
    if on_replies is None:
        return lambda finished, sampled: None
    return lambda finished, sampled: on_replies(
        ReplyProgress(server_round, phase, finished, sampled))


def evaluate(strategy: FedtuneStrategy, grid: Grid, server_round: int,
             on_replies: OnReplies | None = None) -> float | None:
    """The held-out loss of the global adapter on the evaluating clients (None in a
    round without evaluation, or when none could evaluate)."""
    timeout = strategy.scenario.federation.round_timeout
    messages = list(strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(),
                                                grid))
    if not messages:
        return None
    replies = exchange(grid, messages, timeout, _reporter(on_replies, server_round, "evaluate"))
    metrics = strategy.aggregate_evaluate(server_round, replies)
    return None if metrics is None else float(metrics["eval-loss"])


def train_round(strategy: FedtuneStrategy, grid: Grid, server_round: int,
                on_replies: OnReplies | None = None) -> dict[str, Any]:
    """One round: train, aggregate, evaluate; its record."""
    timeout = strategy.scenario.federation.round_timeout
    start = time.perf_counter()
    messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
    report = _reporter(on_replies, server_round, "train")
    failure: dict[str, str] = {}
    if strategy.scenario.privacy.secure_aggregation:  # five exchanges, then only the sum
        try:
            train_metrics = secagg.secure_train(
                strategy, lambda batch: exchange(grid, batch, timeout, report), server_round,
                messages)
        except RoundFailedError as failed:  # a failed round, never a failed run
            train_metrics = secagg.failed_round(strategy, server_round, failed)
            failure = {"secagg_failure": secagg.failure_kind(failed)}
        train_done = aggregate_done = time.perf_counter()
    else:
        replies = exchange(grid, messages, timeout, report)
        strategy.record_sent(messages)
        train_done = time.perf_counter()
        _, train_metrics = strategy.aggregate_train(server_round, replies)
        assert train_metrics is not None
        aggregate_done = time.perf_counter()
    eval_loss = evaluate(strategy, grid, server_round, on_replies)
    stats, name_keys = strategy.stats, strategy.population.name_keys
    loss = train_metrics.get("train-loss")  # none under client-level DP
    return {
        "round": server_round,
        "train_loss": None if loss is None else float(loss),
        "eval_loss": eval_loss,
        "bytes_up": stats.bytes_up,
        "bytes_down": stats.bytes_down,
        "bytes_up_dense": stats.bytes_up_dense,
        "clients_sampled": stats.sampled,
        "clients_replied": int(train_metrics["num-clients"]),
        "dropped": list(stats.dropped),
        "refused_names": name_keys.take_refused() if name_keys else [],
        "stragglers": stats.stragglers,
        "dropouts": stats.dropouts,
        **_who(strategy),
        **failure,
        **{k.replace("-", "_"): v for k, v in train_metrics.items()
           if k not in ("train-loss", "num-clients", "seconds-aggregate")},
        "seconds": time.perf_counter() - start,
        "seconds_train_phase": train_done - start,
        "seconds_aggregate": aggregate_done - train_done,
        "seconds_eval_phase": time.perf_counter() - aggregate_done,
        **client_time_breakdown(stats.client_records),
    }


def _who(strategy: FedtuneStrategy) -> dict[str, list[int]]:
    """Which partitions were sampled and which a simulated fault took out; nothing under
    client-level DP, whose guarantee needs the sample to stay secret (counts only)."""
    if strategy.dp is not None:
        return {}
    stats = strategy.stats
    return {"sampled_partitions": stats.partitions, "dropped_out": stats.dropped_out,
            "late": stats.late}


def run_rounds(strategy: FedtuneStrategy, grid: Grid, on_round: RoundCallback,
               first_round: int = 1, on_replies: OnReplies | None = None,
               initial_eval: bool = True) -> None:
    """Rounds ``first_round``.. (2 and on after a resume), each reported to ``on_round``
    when it ends (round 0: the evaluation before training, on a fresh run)."""
    if initial_eval and first_round == 1:
        on_round({"round": 0, "eval_loss": evaluate(strategy, grid, 0, on_replies)})
    for server_round in range(first_round, strategy.scenario.run.rounds + 1):
        reason = None if strategy.dp is None else strategy.dp.stop_before(server_round)
        if reason is not None:
            log.warning("stopping before round %d: %s", server_round, reason)
            break
        try:
            record = train_round(strategy, grid, server_round, on_replies)
        except BudgetStop as stop:  # fewer clients available than planned: q rose
            log.warning("stopping before round %d: %s", server_round, stop)
            break
        on_round(record)


def announce_end(strategy: FedtuneStrategy, grid: Grid, last_round: int) -> int:
    """Tell every connected deployed client that the run is over and hand it the final
    global adapter (the exported tensors), so an application embedding a client can
    use the result and stop; returns how many acknowledged. Simulated clients have
    nothing to keep and are not told."""
    nodes = strategy.population.named_nodes(grid)
    if not nodes or strategy.global_adapter is None:
        return 0
    payload = keys.state_to_record(scale_folded_state_dict(strategy.global_adapter.factors))
    messages = [Message(content=keys.make_content(payload, {keys.ROUND: last_round,
                                                            keys.FINAL: True}),
                        message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    timeout = min(strategy.scenario.federation.round_timeout, 60.0)
    replies = grid.send_and_receive(messages, timeout=timeout)
    told = sum(not r.has_error() for r in replies)
    log.info("fedtune: %d of %d connected clients received the final adapter",
             told, len(nodes))
    return told
