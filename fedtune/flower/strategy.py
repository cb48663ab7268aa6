"""Flower Strategy adapter: Flower messages in, a fedtune aggregator in the middle.

The strategy keeps Flower's contract (configure / aggregate, train and evaluate) and
delegates the rest: who takes part to ``population`` (discovery, names, settings,
seeded sampling, simulated faults), what a reply is worth to ``replies`` (pure checks:
a bad reply is dropped with a logged reason and the round goes on), client-level DP to
``fedtune.privacy.wrapper``. It keeps the global adapter in factored form (core types)
and the bytes each round moved. The round loop is the ServerApp's (``rounds``).

Under client-level DP (``self.dp``) a round is DP-FedAvg's: a Poisson sample (secret:
nothing here logs or records who was in it, only counts), no minimum of replies (a
small or empty cohort still releases, with the noise of any other round: whether a
round is released must not depend on who was drawn), no per-client records, and no
federated evaluation unless ``privacy.federated_eval`` asks for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from fedtune.aggregation import get_aggregator
from fedtune.config import ConfigError, Scenario
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors
from fedtune.core.codec import (
    A_SUFFIX,
    B_SUFFIX,
    factors_from_state_dict,
    scale_folded_state_dict,
    state_dict_from_factors,
)
from fedtune.core.seeds import round_seed
from fedtune.flower import messages as keys
from fedtune.flower import replies as checks
from fedtune.flower.orders import scenario_orders
from fedtune.flower.population import Population, RoundFailedError, check_distributed_ranks
from fedtune.flower.round_stats import RoundStats
from fedtune.planning.client_settings import ClientSettings
from fedtune.privacy.sampling import PoissonCohort, rate_for
from fedtune.privacy.wrapper import ClientLevelDPAggregator, DPSettings

log = logging.getLogger("fedtune")

RoundCallback = Callable[[dict[str, Any]], None]
__all__ = ["BudgetStop", "FedtuneStrategy", "RoundFailedError", "RoundStats"]


class BudgetStop(RuntimeError):
    """The round about to be sampled would take epsilon past the budget at the sampling
    rate the clients available now impose."""


def dp_settings(scenario: Scenario, settings: Iterable[ClientSettings]) -> DPSettings | None:
    """The run's client-level DP (None without): distributed DP needs one LoRA scale, as
    every client clips and noises its update at its own scale, and one rank, as a client
    noises only the components of its own rank: the components above the smallest
    rank of a release at the population's rank would carry less noise than z C."""
    p = scenario.privacy
    if not p.client_level:
        return None
    settings = list(settings)
    check_distributed_ranks(scenario, [s.rank for s in settings])
    scales = {s.alpha / s.rank for s in settings}
    if p.mode == "distributed" and len(scales) > 1:
        raise ConfigError(
            f"privacy.mode = 'distributed' needs one LoRA scale alpha / r across clients, "
            f"got {sorted(scales)}: a client's clip would not bound its update in the "
            "global adapter's scale; give the profiles alpha proportional to rank, or "
            "use mode = 'central'")
    return DPSettings.planned(p, scenario.privacy_plan())


class FedtuneStrategy(Strategy):
    """Runs fedtune's aggregators inside Flower's Strategy contract."""

    def __init__(self, scenario: Scenario, on_client: RoundCallback | None = None) -> None:
        self.scenario = scenario
        fed = scenario.federation
        self.aggregator = get_aggregator(fed.aggregator, **fed.aggregator_options())
        #: bounded influence before every aggregate without client-level DP
        self.influence = fed.influence_bound()
        self.population = Population(scenario)
        dp = dp_settings(scenario, self.population.settings)
        self.dp = None if dp is None else ClientLevelDPAggregator(
            self.aggregator, dp, scenario.run.seed)
        #: this round's Poisson draw under client-level DP (never written anywhere)
        self.cohort: PoissonCohort | None = None
        self.global_adapter: GlobalAdapter | None = None
        #: module -> (in, out) of every adapted module, from the base model's config
        self.expected = checks.expected_modules(scenario.model.source,
                                                 scenario.lora.target_modules)
        self.upload = scenario.compression.upload()
        self.download = scenario.compression.download()
        #: this round's train payload per (rank, alpha), before download compression: the
        #: server adds a client's compressed update to it (``replies.client_start_state``)
        self.sent: dict[tuple[int, float], dict[str, Tensor]] = {}
        self.on_client = on_client or (lambda record: None)
        self.stats = RoundStats()

    # the population's state, as the strategy's own (what tests and checkpoints read)
    node_partition = property(lambda self: self.population.node_partition,
                              lambda self, v: setattr(self.population, "node_partition", v))
    names = property(lambda self: self.population.names)
    declared = property(lambda self: self.population.declared)
    settings = property(lambda self: self.population.settings)
    pruned_rank = property(lambda self: self.population.pruned_rank)
    rng = property(lambda self: self.population.rng)
    accountant = property(lambda self: None if self.dp is None else self.dp.accountant)
    stopped = property(lambda self: None if self.dp is None else self.dp.stopped)

    def _settings(self, node: int) -> ClientSettings:
        return self.population.settings_for(node)

    def _register_named(self, named: dict[int, tuple[str, str]]) -> None:
        self.population.register_named(named)

    def discover(self, grid: Grid) -> None:
        self.population.discover(grid)

    def _sample_nodes(self, grid: Grid, wanted: int) -> list[int]:
        self.discover(grid)
        return self.population.sample(grid, wanted)

    # ---- train ---------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.stats = RoundStats()
        if self.dp is None:
            nodes = self._sample_nodes(grid, self.scenario.sampled_per_round)
        else:
            nodes = self._dp_sample(grid, server_round)
        self.stats.sampled = len(nodes)
        nodes = self._without_simulated_faults(nodes, server_round)
        self.stats.nodes = list(nodes)
        return self._train_messages(nodes, server_round)

    def _dp_sample(self, grid: Grid, server_round: int) -> list[int]:
        """DP-FedAvg's Poisson sample of the clients available now, after checking that
        the budget pays for a round at the rate they impose (``BudgetStop`` if not)."""
        self.discover(grid)
        available = self.population.available(grid)
        expected = self.scenario.sampled_per_round
        assert self.dp is not None
        reason = self.dp.stop_before(server_round, rate_for(expected, len(available)))
        if reason is not None:
            raise BudgetStop(reason)
        nodes, self.cohort = self.population.poisson_sample(available, expected)
        if self.cohort.rate > self.dp.settings.sample_rate * (1 + 1e-9):
            log.warning("round %d: %d clients available, fewer than planned: sampling rate "
                        "%.4g instead of %.4g (charged as such)", server_round,
                        len(available), self.cohort.rate, self.dp.settings.sample_rate)
        return nodes

    def _without_simulated_faults(self, nodes: list[int], server_round: int) -> list[int]:
        """The sampled nodes (in partition order) that neither drop out nor miss the
        deadline in this round's seeded draw; the others are counted and not sent work."""
        if self.dp is None:  # under client-level DP who was sampled is a secret
            self.stats.partitions = sorted(self.node_partition[n] for n in nodes)
        faults = self.population.simulated_faults(nodes, server_round)
        if faults is None:
            return nodes
        self.stats.count_faults(faults, keep_who=self.dp is None)
        if faults.lost:
            log.info("round %d: simulated faults: %d dropped out, %d past the %.0f s deadline",
                     server_round, len(faults.dropped), len(faults.stragglers),
                     self.scenario.simulation.round_deadline)
        return [n for n in nodes if self.node_partition[n] not in faults.lost]

    def _train_payload(self, settings: ClientSettings) -> dict[str, LoraFactors]:
        """continue mode: factors re-expressed at the client's own LoRA scale, to load as
        its trainable adapter; residual mode: the global adapter at scale 1, applied frozen."""
        if self.global_adapter is None:
            return {}
        residual = self.aggregator.capabilities.client_mode == "residual"
        scale = None if residual else settings.alpha / settings.rank
        return self.aggregator.payload_for(self.global_adapter, settings.rank, scale=scale)

    def _train_messages(self, nodes: list[int], server_round: int) -> list[Message]:
        """One message per node: its payload, its settings, the round's seed and mode."""
        records: dict[tuple[int, float], ArrayRecord] = {}  # one encoding per (rank, alpha)
        self.sent = {}
        common = self._train_config(server_round)
        messages = []
        for node in nodes:
            settings = self._settings(node)
            key = (settings.rank, settings.alpha)
            if key not in records:
                self.sent[key] = state_dict_from_factors(self._train_payload(settings))
                records[key] = keys.encode_record(self.sent[key], self.download)
            self.stats.down_by_node[node] = keys.record_nbytes(records[key])
            self.stats.bytes_down += self.stats.down_by_node[node]
            content = keys.make_content(records[key], {**common, **settings.to_config()})
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node))
        return messages

    def _train_config(self, server_round: int) -> dict[str, Any]:
        """What every client of the round is told: the round, its seed, and what the
        scenario orders (``fedtune.flower.orders``: the client derives the same itself and
        refuses anything else)."""
        return {keys.ROUND: server_round,
                keys.SEED: round_seed(self.scenario.run.seed, server_round),
                **scenario_orders(self.scenario)}

    def record_sent(self, messages: Iterable[Message]) -> None:
        """Remember where each pushed message went (its id is set when it is pushed)."""
        self.stats.message_node = {m.metadata.message_id: m.metadata.dst_node_id
                                   for m in messages}

    def _rules(self) -> checks.TrainRules:
        fed = self.scenario.federation
        return checks.TrainRules(
            self.expected, self.scenario.run.seed, self.aggregator.capabilities.client_mode,
            fed.flora_init, fed.max_examples, fed.max_update_norm, fed.prune_gamma > 0.0,
            keep_start=(self.dp is not None or fed.merge == "ties"
                        or self.influence.median_norm_multiple > 0), sent=self.sent,
            client_dp=self.dp is not None,
            sample_dp=self.dp is None and self.scenario.privacy.sample_level)

    def _decode(self, message: Message) -> ClientUpdate:
        """One reply as a ClientUpdate, or an exception that says why it is dropped."""
        node = self._sender(message)
        if message.has_error():
            raise ValueError(f"client error: {checks.short_reason(message.error.reason)}")
        if node not in self.node_partition:
            raise ValueError("reply from a node that was not sampled")
        settings = self._settings(node)
        update = checks.train_update(message.content, settings, self._rules())
        if self._factor_dp and update.metrics["rank"] > self._release_rank_now():
            raise ValueError(f"rank {update.metrics['rank']} is above the release's rank "
                             f"{self._release_rank_now()} (fixed at round 1 under "
                             "client-level DP)")
        if update.metrics["rank"] < settings.rank:
            self.population.pruned_rank[settings.partition] = int(update.metrics["rank"])
        return update

    def _sender(self, message: Message) -> int:
        """The node a reply is about (for an error the SuperLink sent in its place too)."""
        node = message.metadata.src_node_id
        if node in self.node_partition:
            return node
        return self.stats.message_node.get(message.metadata.reply_to_message_id, node)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates: list[ClientUpdate] = []
        answered: set[int] = set()
        for message in replies:
            node = self._sender(message)
            answered.add(node)
            try:
                update = self._decode(message)
            except Exception as err:  # noqa: BLE001 - one reply's failure is that reply's
                self._drop(server_round, node, checks.drop_reason(err))
                continue
            updates.append(update)
            self._record_client(server_round, node, update, message)
        updates.sort(key=lambda u: int(u.client_id))  # arrival order must not matter
        self.stats.count_stragglers(server_round, answered,
                                    self.scenario.federation.round_timeout,
                                    name_nodes=self.dp is None)
        start = time.perf_counter()
        if self.dp is None:
            self._check_minimum(server_round, updates)
            updates = self.influence.apply(updates)  # under DP its clip is the bound
            self.global_adapter = self.aggregator.aggregate(updates, self.global_adapter)
        else:
            self.global_adapter = self.dp_release(server_round, updates)
        metrics = MetricRecord({
            **self._train_loss(updates),
            "num-clients": len(updates),
            "seconds-aggregate": time.perf_counter() - start,
            **{k.replace("_", "-"): float(v) for k, v in (self.dp or self.aggregator)
               .metrics().items()},
            **(self.influence.metrics() if self.dp is None else {}),
            **checks.sample_epsilon_max(updates),
        })
        return keys.factors_to_record(self.global_adapter.factors), metrics

    def _drop(self, server_round: int, node: int, reason: str) -> None:
        """Count a reply that is not used (under client-level DP without naming its node:
        that a node was sent work says it was sampled)."""
        if self.dp is None:
            self.stats.dropped.append(f"node {node}: {reason}")
            log.warning("round %d: dropped reply from node %s: %s", server_round, node,
                        reason)
        else:  # nor its reason: a refusing client names itself in it
            self.stats.dropped.append("a sampled client's reply was not used")
            log.warning("round %d: dropped a reply (under client-level DP its reason is "
                        "not logged: it may name the client)", server_round)

    def _check_minimum(self, server_round: int, updates: list[ClientUpdate]) -> None:
        minimum, rule = self.population.minimum_replies()
        if len(updates) < minimum:
            raise RoundFailedError(
                f"round {server_round}: {len(updates)} valid replies, fewer than {rule}; "
                f"dropped: {self.stats.dropped}")

    def dp_release(self, server_round: int, updates: list[ClientUpdate]) -> GlobalAdapter:
        """The DP wrapper's release: the clipped sum over the expected cohort q * N (not
        the replies), the accountant charged at the q this round was drawn with, in the
        population's shape from round 1 (never the shape of the clients sampled)."""
        assert self.dp is not None and self.cohort is not None
        first_base = self.population_start() if self.global_adapter is None else None
        return self.dp.aggregate(updates, self.global_adapter, server_round,
                                 self.cohort.expected, [s.rank for s in self.settings],
                                 sample_rate=self.cohort.rate, first_base=first_base)

    @property
    def _factor_dp(self) -> bool:
        """Client-level DP releasing factors (fedavg, zeropad, ffa): the release's shape
        is the population's, and no reply may be wider."""
        return self.dp is not None and self.aggregator.capabilities.dp_form == "factor"

    def _release_rank_now(self) -> int:
        """The released adapter's rank (the population's largest before round 1)."""
        if self.global_adapter is None:
            return self.release_rank
        return max(f.rank for f in self.global_adapter.factors.values())

    @property
    def release_rank(self) -> int:
        """The rank of every release under client-level DP: the largest any client of
        the population may train (its planned settings, known before round 1)."""
        return max(s.rank for s in self.settings)

    def population_start(self) -> dict[str, LoraFactors]:
        """What the first release goes on: the seeded start of a client of the
        population's largest rank (the seeded init, public), at the population's scale
        (the clients' common alpha / r, or 1 when they differ, as ``shared_scale``)."""
        settings = max(self.settings, key=lambda s: s.rank)
        like = {}
        for module, (size_in, size_out) in self.expected.items():
            like[module + A_SUFFIX] = torch.empty(settings.rank, size_in)
            like[module + B_SUFFIX] = torch.empty(size_out, settings.rank)
        state = checks.client_start_state(settings, like, self._rules())
        own = settings.alpha / settings.rank
        scales = {s.alpha / s.rank for s in self.settings}
        scale = scales.pop() if len(scales) == 1 else 1.0
        return {m: LoraFactors(A=f.A, B=f.B * (own / scale), scale=scale)
                for m, f in factors_from_state_dict(state, own).items()}

    def _train_loss(self, updates: list[ClientUpdate]) -> dict[str, float]:
        """The example-weighted training loss, never under DP (an un-noised number about
        the clients' data)."""
        updates = [u for u in updates if keys.TRAIN_LOSS in u.metrics]  # none under DP-SGD
        total = sum(u.num_examples for u in updates)
        if self.dp is not None or not total:
            return {}
        loss = sum(u.metrics[keys.TRAIN_LOSS] * u.num_examples for u in updates) / total
        return {"train-loss": loss}

    def _record_client(self, server_round: int, node: int, update: ClientUpdate,
                       message: Message) -> None:
        """Count the reply's bytes and report the client (the server's own measurements
        last: a client's metric cannot overwrite them). Under client-level DP only the
        round's totals: a per-client record would say who was sampled."""
        up = keys.record_nbytes(message.content.array_records[keys.ADAPTER])
        dense = 4 * sum(f.A.numel() + f.B.numel() for f in update.factors.values())
        self.stats.bytes_up += up
        self.stats.bytes_up_dense += dense
        if self.dp is not None:
            return
        record = {**{k.replace("-", "_"): v for k, v in update.metrics.items()},
                  "round": server_round, "phase": "train", "node_id": node,
                  "client": update.client_id, "bytes_up": up,
                  "bytes_down": self.stats.down_by_node.get(node, 0), "bytes_up_dense": dense}
        self.stats.client_records.append(record)
        self.on_client(record)

    # ---- evaluate ------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        every = self.scenario.federation.eval_every
        last = server_round == self.scenario.run.rounds
        if server_round % every and not last and server_round != 0:
            return []
        if not self.federated_eval:
            return []
        self.discover(grid)
        return self._eval_messages(self.population.eval_nodes(), server_round)

    def _eval_messages(self, nodes: list[int], server_round: int) -> list[Message]:
        """Every node evaluates exactly the global adapter (scale folded into B), the
        same tensors that are exported at the end of the run."""
        state = {} if self.global_adapter is None else scale_folded_state_dict(
            self.global_adapter.factors)
        payload = keys.state_to_record(state)
        return [Message(content=keys.make_content(payload, {keys.ROUND: server_round,
                                                            **self._settings(n).to_config()}),
                        message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        loss_sum, tokens = 0.0, 0
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                self._eval_failed(server_round, node, "evaluation failed",
                                  message.error.reason)
                continue
            try:
                loss, count, m = checks.eval_numbers(message.content,
                                                     self._eval_token_cap())
            except Exception as err:  # noqa: BLE001 - one reply's failure is that reply's
                self._eval_failed(server_round, node, "ignored the evaluation",
                                  checks.drop_reason(err))
                continue
            loss_sum += loss * count
            tokens += count
            self.on_client({**{k.replace("-", "_"): v for k, v in m.items()},
                            "round": server_round, "phase": "eval", "node_id": node})
        if tokens == 0:
            return None
        return MetricRecord({"eval-loss": loss_sum / tokens, "eval-tokens": tokens})

    def _eval_failed(self, server_round: int, node: int, what: str, reason: str) -> None:
        """Log an evaluation that is not used; under client-level DP without the node or
        the reason (a refusing client names itself in it)."""
        if self.dp is None:
            log.warning("round %d: %s on node %s: %s", server_round, what, node, reason)
        else:
            log.warning("round %d: %s on a client (reason not logged under client-level "
                        "DP)", server_round, what)

    def _eval_token_cap(self) -> int:
        """A client's held-out blocks are at most data.seq_len long (a profile only
        shortens them: ``client_settings``)."""
        data = self.scenario.data
        return checks.eval_token_cap(data.max_eval_sequences,
                                     self.scenario.federation.max_examples,
                                     data.eval_fraction, data.seq_len)

    @property
    def federated_eval(self) -> bool:
        """Under client-level DP the clients' held-out losses are un-noised numbers about
        their data: evaluation runs only when ``privacy.federated_eval`` says so."""
        return self.dp is None or self.scenario.privacy.federated_eval

    def summary(self) -> None:
        log.info("fedtune strategy: aggregator=%s rounds=%d clients/round=%d",
                 self.aggregator.name, self.scenario.run.rounds, self.scenario.sampled_per_round)

    # ---- checkpoint / resume -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed server needs to go on exactly where this one stopped (see
        ``fedtune.flower.checkpoint``); node ids are not kept: they change on restart."""
        from fedtune.flower.checkpoint import adapter_to_state

        privacy = {"accountant": None, "stopped": None} if self.dp is None else self.dp.state()
        return {"global": adapter_to_state(self.global_adapter),
                "expected": {n: list(v) for n, v in self.expected.items()},
                **self.population.state(), **privacy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from fedtune.flower.checkpoint import CheckpointError, adapter_from_state

        self.global_adapter = adapter_from_state(state["global"])
        saved = {n: (int(v[0]), int(v[1])) for n, v in state["expected"].items()}
        if saved and saved != self.expected:  # shapes come from the base model's config
            raise CheckpointError("the checkpoint's adapted modules are not the base "
                                  "model's; it was made with another model")
        self.population.load_state(state)
        if self.dp is not None:
            self.dp.load_state(state)
