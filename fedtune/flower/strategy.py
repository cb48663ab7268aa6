"""Flower Strategy adapter: Flower messages in, a fedtune aggregator in the middle.

The strategy keeps the global adapter in factored form (core types), samples nodes
with its own seeded generator (so a seeded run is reproducible), validates every
reply before it reaches the aggregator (a bad reply is dropped with a logged reason
and the round goes on), and reports each client and round to a recorder.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result
from torch import Tensor

from fedtune.aggregation import get_aggregator
from fedtune.aggregation.start import client_start, sliced_like
from fedtune.config import DP_FORMS, ConfigError, Scenario
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors, LoraMask
from fedtune.core.codec import (
    A_SUFFIX,
    B_SUFFIX,
    CodecError,
    factors_from_state_dict,
    scale_folded_state_dict,
    state_dict_from_factors,
)
from fedtune.core.init import seeded_lora_state
from fedtune.core.seeds import round_seed, sampler, server_noise_seed, stream
from fedtune.flower import messages as keys
from fedtune.flower import replies as checks
from fedtune.flower.identity import NameKeys
from fedtune.planning.client_settings import ClientSettings, client_settings
from fedtune.privacy import GaussianNoise, PrivacyAccountant
from fedtune.privacy.mechanism import ClientLevelDP, dense_release, factor_release

log = logging.getLogger("fedtune")

RoundCallback = Callable[[dict[str, Any]], None]


class RoundFailedError(RuntimeError):
    """Too few valid replies for the configured minimum."""


@dataclass
class RoundStats:
    """What the strategy measured in one round (bytes from the actual arrays)."""

    bytes_down: int = 0
    bytes_up: int = 0
    bytes_up_dense: int = 0  # the same updates as dense fp32 data
    down_by_node: dict[int, int] = field(default_factory=dict)
    sampled: int = 0
    nodes: list[int] = field(default_factory=list)  # the nodes sampled this round
    dropped: list[str] = field(default_factory=list)
    stragglers: int = 0  # sampled nodes with no reply before the round deadline
    dropouts: int = 0  # sampled clients a simulated fault took out (fedtune.planning.faults)
    #: partitions sampled this round, and those a simulated fault took out
    partitions: list[int] = field(default_factory=list)
    dropped_out: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    #: message id -> node it went to; a SuperLink answers for a node it lost (Node
    #: Unavailable) from its own node id, so such replies are traced back through this
    message_node: dict[str, int] = field(default_factory=dict)
    client_records: list[dict[str, Any]] = field(default_factory=list)


def _with_fixed_rank(profile: str, rank: int) -> str | None:
    """The profile TOML with ``rank = "auto"`` replaced by the federation's rank (for an
    aggregator that needs one rank), or None when its rank is not "auto"."""
    import tomli_w
    import tomllib

    try:
        fields = tomllib.loads(profile)
    except tomllib.TOMLDecodeError:
        return None
    if fields.get("rank") != "auto":
        return None
    return tomli_w.dumps({**fields, "rank": rank})


class FedtuneStrategy(Strategy):
    """Runs fedtune's aggregators inside Flower's Strategy contract."""

    def __init__(
        self,
        scenario: Scenario,
        on_client: RoundCallback | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        self.scenario = scenario
        self.aggregator = get_aggregator(scenario.federation.aggregator,
                                         **scenario.federation.aggregator_options())
        self.settings = client_settings(scenario)
        self.node_partition: dict[int, int] = {}
        #: deployment: client name -> partition (stable across client restarts and resumes)
        self.names: dict[str, int] = {}
        #: deployment: the profile (TOML text) each partition declared when it first joined
        self.declared: dict[int, str] = {}
        #: deployment with node authentication: which key owns which name
        self.name_keys: NameKeys | None = NameKeys() if scenario.server.auth_keys else None
        self.global_adapter: GlobalAdapter | None = None
        #: module -> (in, out) of every adapted module, from the base model's config
        self.expected = checks.expected_modules(scenario.model.source,
                                                 scenario.lora.target_modules)
        self.pruned_rank: dict[int, int] = {}  # partition -> rank after HetLoRA self-pruning
        self.rng = sampler(scenario.run.seed)
        self.upload = scenario.compression.upload()
        self.download = scenario.compression.download()
        #: this round's train payload per (rank, alpha), before download compression: the
        #: server adds a client's compressed update to it (see ``_client_start``)
        self.sent: dict[tuple[int, float], dict[str, Tensor]] = {}
        self.on_client = on_client or (lambda record: None)
        self.on_round = on_round or (lambda record: None)
        self.stats = RoundStats()
        self.privacy = scenario.privacy
        self.plan = scenario.privacy_plan() if self.privacy.client_level else None
        self.accountant = (PrivacyAccountant(self.privacy.delta, self.privacy.accountant)
                           if self.plan is not None else None)
        #: why the run ended before its planned rounds (the privacy budget), or None
        self.stopped: str | None = None
        self._check_distributed_scales()

    def _check_distributed_scales(self) -> None:
        """Distributed DP: every client clips and noises its update at its own LoRA scale,
        which is the global's only when all clients share alpha / r."""
        scales = {s.alpha / s.rank for s in self.settings}
        if self.privacy.mode == "distributed" and len(scales) > 1:
            raise ConfigError(
                f"privacy.mode = 'distributed' needs one LoRA scale alpha / r across clients, "
                f"got {sorted(scales)}: a client's clip would not bound its update in the "
                "global adapter's scale; give the profiles alpha proportional to rank, or "
                "use mode = 'central'")

    @property
    def dp_fields(self) -> tuple[str, ...]:
        """The factors the client-level mechanism releases (ffa: only B; A is frozen)."""
        return ("B",) if self.aggregator.freeze_A else ("A", "B")

    # ---- helpers ---------------------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid, wanted: int, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            if time.monotonic() > deadline:
                raise RoundFailedError(
                    f"only {len(nodes)} nodes connected after {timeout:.0f} s, need {wanted}"
                )
            time.sleep(0.5)
        return nodes

    def discover(self, grid: Grid) -> None:
        """Ask every node that has not yet said so which client it is, so the server can
        send each node the settings of its own device profile. The first call waits for
        the whole population; later ones only look at nodes that (re)joined since."""
        timeout = self.scenario.federation.round_timeout
        if self.node_partition:
            nodes = sorted(grid.get_node_ids())
        else:
            nodes = self._wait_for_nodes(grid, self.scenario.data.num_clients,
                                         self.scenario.server.wait_for_clients)
            if self._take_simulated_mapping(nodes):
                return
        unknown = [n for n in nodes if n not in self.node_partition]
        if not unknown:
            return
        queries = [Message(content=keys.make_content(None, {keys.ROUND: 0}),
                           message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        named: dict[int, tuple[str, str]] = {}
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not say who it is: %s", node, reply.error.reason)
                continue
            identity = reply.content.config_records.get(keys.IDENTITY)
            if identity is not None:  # a deployed client: known by its name
                named[node] = (str(identity[keys.CLIENT_NAME]),
                               str(identity.get(keys.CLIENT_PROFILE, "")))
                continue
            partition = int(reply.content.metric_records[keys.METRICS][keys.PARTITION])
            if not 0 <= partition < len(self.settings):
                log.warning("node %s reports partition %d, outside 0..%d; ignored",
                            node, partition, len(self.settings) - 1)
                continue
            self.node_partition[node] = partition
        if named and self.name_keys is not None:
            held = {n.node_id: bytes(n.public_key) for n in grid.get_nodes()}
            named = self.name_keys.admit(named, held)
        if named:
            self._register_named(named)

    def _take_simulated_mapping(self, nodes: list[int], wait: float = 5.0) -> bool:
        """Use the engine's own node -> partition mapping when ``fedtune simulate``
        recorded one for exactly these nodes (see ``fedtune.flower.simulated_nodes``)."""
        from fedtune.flower.simulated_nodes import partitions

        deadline = time.monotonic() + wait
        while True:
            known = partitions()
            if known and set(known) >= set(nodes):
                self.node_partition = {n: known[n] for n in nodes
                                       if 0 <= known[n] < len(self.settings)}
                return True
            if not known or time.monotonic() > deadline:  # not a fedtune simulation
                return False
            time.sleep(0.05)  # the engine is still registering nodes

    def _register_named(self, named: dict[int, tuple[str, str]]) -> None:
        """Deployed clients get partitions in the order of their names (so a restarted
        client, or a resumed server, finds the same client at the same place); a client
        that returns under its name replaces its old node. Profiles declared at the
        first sight of a client set its settings for the rest of the run."""
        fresh: dict[int, str] = {}
        for node, (name, profile) in sorted(named.items(), key=lambda item: item[1][0]):
            if name not in self.names:
                if len(self.names) >= self.scenario.data.num_clients:
                    log.warning("client %r (node %s) is one more than data.num_clients = %d; "
                                "ignored", name, node, self.scenario.data.num_clients)
                    continue
                self.names[name] = len(self.names)
                if profile:
                    fresh[self.names[name]] = profile
            partition = self.names[name]
            for old in [n for n, p in self.node_partition.items() if p == partition]:
                log.info("client %r rejoined as node %s (was node %s)", name, node, old)
                del self.node_partition[old]
            self.node_partition[node] = partition
        for partition, profile in fresh.items():
            self._declare(partition, profile)

    def _declare(self, partition: int, profile: str) -> None:
        """Take a client's declared profile unless the federation cannot serve it (a bad
        file, a rank the aggregator refuses): then that client keeps the server's
        settings, and the run goes on."""
        for attempt in (profile, _with_fixed_rank(profile, self.scenario.lora.rank)):
            if attempt is None:
                continue
            self.declared[partition] = attempt
            try:
                self._apply_declared_profiles()
                return
            except (ValueError, KeyError) as err:  # ProfileError, ConfigError, MemoryBudget
                problem = err
        del self.declared[partition]
        self._apply_declared_profiles()
        log.warning("client %d declared a device profile the federation cannot serve (%s); "
                    "it trains with the server's settings", partition, problem)

    def _apply_declared_profiles(self) -> None:
        """Settings from the profiles deployed clients declared (see ``_register_named``)."""
        import tomllib

        from fedtune.planning.client_settings import check_ranks, settings_from_profiles
        from fedtune.planning.profiles import DeviceProfile

        profiles = [None] * self.scenario.data.num_clients
        for partition, text in self.declared.items():
            profiles[partition] = DeviceProfile.from_dict(
                tomllib.loads(text), origin=f"the profile client {partition} declared")
        settings = settings_from_profiles(self.scenario, profiles)
        check_ranks(self.scenario, [s.rank for s in settings])
        self.settings = tuple(settings)

    def _sample_nodes(self, grid: Grid, wanted: int) -> list[int]:
        """Seeded sample of clients by partition id (node ids are random per run) among
        the nodes connected now; fewer than ``wanted`` when some are gone (a round still
        needs its minimum of replies)."""
        self.discover(grid)
        live = set(grid.get_node_ids())
        by_partition = {p: n for n, p in self.node_partition.items() if n in live}
        if len(by_partition) < self.minimum_replies()[0]:
            raise RoundFailedError(
                f"{len(by_partition)} identified clients are connected, fewer than "
                f"{self.minimum_replies()[1]}")
        if len(by_partition) < wanted:
            log.warning("only %d of the %d clients to sample are connected; sampling them",
                        len(by_partition), wanted)
            wanted = len(by_partition)
        chosen = sorted(self.rng.sample(sorted(by_partition), wanted))
        return [by_partition[p] for p in chosen]

    def minimum_replies(self) -> tuple[int, str]:
        """The fewest valid replies a round may aggregate, and the rule that says so."""
        minimum = self.scenario.federation.min_clients
        rule = f"federation.min_clients = {minimum}"
        if self.plan is not None and self.privacy.min_clients > minimum:
            minimum = self.privacy.min_clients
            rule = f"privacy.min_clients = {minimum}"
        return minimum, rule

    def _settings(self, node: int) -> ClientSettings:
        """The node's profile settings, with its self-pruned rank once it has pruned
        (alpha follows the rank so the LoRA scale alpha / r is unchanged)."""
        settings = self.settings[self.node_partition[node]]
        rank = self.pruned_rank.get(settings.partition)
        if rank is None:
            return settings
        return replace(settings, rank=rank, alpha=settings.alpha * rank / settings.rank)

    def _train_payload(self, settings: ClientSettings) -> dict[str, LoraFactors]:
        """continue mode: factors re-expressed at the client's own LoRA scale, to load as
        its trainable adapter; residual mode: the global adapter at scale 1, applied frozen."""
        if self.global_adapter is None:
            return {}
        residual = self.aggregator.client_mode == "residual"
        scale = None if residual else settings.alpha / settings.rank
        return self.aggregator.payload_for(self.global_adapter, settings.rank, scale=scale)

    def _train_messages(self, nodes: list[int], server_round: int) -> list[Message]:
        """One message per node: its payload, its settings, the round's seed and mode."""
        records: dict[tuple[int, float], ArrayRecord] = {}  # one encoding per (rank, alpha)
        self.sent = {}
        messages = []
        for node in nodes:
            settings = self._settings(node)
            key = (settings.rank, settings.alpha)
            if key not in records:
                self.sent[key] = state_dict_from_factors(self._train_payload(settings))
                records[key] = keys.encode_record(self.sent[key], self.download)
            payload = records[key]
            self.stats.down_by_node[node] = keys.record_nbytes(payload)
            self.stats.bytes_down += self.stats.down_by_node[node]
            config = {keys.ROUND: server_round, keys.SEED: self._round_seed(server_round),
                      keys.MODE: self.aggregator.client_mode,
                      keys.FREEZE_A: self.aggregator.freeze_A,
                      keys.PRUNE_GAMMA: self.scenario.federation.prune_gamma,
                      keys.INIT: self.scenario.federation.flora_init,
                      **self._upload_config(), **self._privacy_config(),
                      **settings.to_config()}
            messages.append(Message(content=keys.make_content(payload, config),
                                    message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    def _upload_config(self) -> dict[str, Any]:
        compression = self.scenario.compression
        return {keys.UPLOAD_DENSITY: self.upload.density, keys.UPLOAD_VALUES: self.upload.values,
                keys.BLOCK_SIZE: self.upload.block_size,
                keys.ERROR_FEEDBACK: compression.error_feedback,
                keys.SELECTION: compression.selection}

    def _privacy_config(self) -> dict[str, Any]:
        """What a client needs for distributed client-level DP and for DP-SGD."""
        p, out = self.privacy, {}
        if p.mode == "distributed" and self.plan is not None:
            share = self.plan.noise_multiplier * p.clip_norm / math.sqrt(p.min_clients)
            out.update({keys.DP_CLIP: p.clip_norm, keys.DP_NOISE_STD: share,
                        keys.DP_FIELDS: ",".join(self.dp_fields)})
        if p.sample_level:
            out.update({keys.DPSGD_NOISE: p.sample_noise_multiplier,
                        keys.DPSGD_CLIP: p.sample_clip_norm, keys.DPSGD_DELTA: p.delta,
                        keys.DPSGD_ACCOUNTANT: p.accountant})
        if out:
            out[keys.DP_SECURE] = p.secure_noise
        return out

    def _round_seed(self, server_round: int) -> int:
        return round_seed(self.scenario.run.seed, server_round)

    def _eval_messages(self, nodes: list[int], server_round: int) -> list[Message]:
        """Every node evaluates exactly the global adapter (scale folded into B), the
        same tensors that are exported at the end of the run."""
        state = {} if self.global_adapter is None else scale_folded_state_dict(
            self.global_adapter.factors)
        payload = keys.state_to_record(state)
        messages = []
        for node in nodes:
            config = {keys.ROUND: server_round, **self._settings(node).to_config()}
            messages.append(Message(content=keys.make_content(payload, config),
                                    message_type=MessageType.EVALUATE, dst_node_id=node))
        return messages

    def _decode(self, message: Message) -> ClientUpdate:
        """Turn one reply into a ClientUpdate or raise (ValueError with the reason, or
        whatever a decoder ran into: the caller drops the reply either way)."""
        node = self._sender(message)
        if message.has_error():
            raise ValueError(f"client error: {short_reason(message.error.reason)}")
        if node not in self.node_partition:
            raise ValueError("reply from a node that was not sampled")
        settings = self._settings(node)
        content = message.content
        if keys.ADAPTER not in content.array_records or keys.METRICS not in content.metric_records:
            raise ValueError("reply has no adapter or no metrics")
        metrics = dict(content.metric_records[keys.METRICS])
        checks.check_metrics(metrics)
        loss = metrics.get(keys.TRAIN_LOSS)
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            raise ValueError(f"train-loss must be a finite number, got {loss!r}")
        num_examples = checks.checked_examples(metrics, self.scenario.federation.max_examples)
        record = content.array_records[keys.ADAPTER]
        scale = settings.alpha / settings.rank  # a pruned reply keeps it: alpha follows r
        pruning = self.scenario.federation.prune_gamma > 0.0
        try:
            rule = checks.ShapeRule(self.expected, settings.rank, pruning)
            decoded = checks.decode_adapter(record, rule)
            factors = factors_from_state_dict(decoded.values, scale)
        except CodecError as err:
            raise ValueError(f"undecodable adapter: {err}") from None
        if not factors:
            raise ValueError("empty adapter")
        bad = [name for name, f in factors.items() if not f.is_finite()]
        if bad:
            raise ValueError(f"non-finite values in {len(bad)} modules, e.g. {bad[0]}")
        rank = checks.reply_rank(factors, self.expected, settings.rank, pruning)
        packed = keys.is_packed(record)
        bound = self.scenario.federation.max_update_norm
        start = None
        if (packed or self.plan is not None or bound > 0
                or getattr(self.aggregator, "merge", "mean") == "ties"):
            start = factors_from_state_dict(self._client_start(settings, decoded.values), scale)
        if packed:  # the reply is an update: add it to the start the server knows
            factors = {n: LoraFactors(A=start[n].A + f.A, B=start[n].B + f.B, scale=scale)
                       for n, f in factors.items()}
        if bound > 0:
            assert start is not None
            norm = update_norm(factors, start)
            if norm > bound:
                raise ValueError(f"update norm {norm:.4g} exceeds federation.max_update_norm "
                                 f"= {bound:g}")
        if rank < settings.rank:
            self.pruned_rank[settings.partition] = rank
        return ClientUpdate(
            factors=factors,
            num_examples=num_examples,
            client_id=str(settings.partition),
            metrics={**metrics, "rank": rank},
            masks=sent_masks(decoded.masks, factors) if packed else None,
            start=start,
        )

    def _client_start(self, settings: ClientSettings, reply: dict[str, Tensor]
                      ) -> dict[str, Tensor]:
        """The LoRA this client started training from, rebuilt exactly as the client built
        it (seeded init at its assigned rank, this round's payload), cut to the reply's
        rank. The payload is taken before download compression, so a compressed update
        lands on the server's full-precision global, not on the client's rounded copy."""
        shapes = {k: ((settings.rank, v.shape[1]) if k.endswith(A_SUFFIX)
                      else (v.shape[0], settings.rank)) for k, v in reply.items()}
        fresh = seeded_lora_state(self.scenario.run.seed, shapes)
        payload = self.sent.get((settings.rank, settings.alpha), {})
        try:
            trainable, _ = client_start(self.aggregator.client_mode,
                                        self.scenario.federation.flora_init, payload, fresh,
                                        settings.alpha / settings.rank, settings.rank)
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"reply does not fit the payload it was sent: {err}") from None
        return sliced_like(trainable, reply)

    def _release(self, updates: list[ClientUpdate], server_round: int
                 ) -> tuple[GlobalAdapter, dict[str, float]]:
        """The round's client-level DP release (see ``fedtune.privacy.mechanism``), and the
        accountant's step for it. Central mode clips and noises here; in distributed mode
        the clients did both and the server only sums."""
        assert self.plan is not None and self.accountant is not None
        p = self.privacy
        central = p.mode == "central"
        dp = ClientLevelDP(p.clip_norm, self.plan.noise_multiplier, self.stats.sampled,
                           clip=central, add_noise=central)
        seed = None if p.secure_noise else server_noise_seed(self._round_seed(server_round))
        noise = GaussianNoise(seed)
        previous = None if self.global_adapter is None else self.global_adapter.factors
        if DP_FORMS[self.aggregator.name] == "factor":
            release = factor_release(updates, previous, dp, noise, self.dp_fields)
        else:
            rank = getattr(self.aggregator, "rank_budget", None) or max(
                s.rank for s in self.settings)
            release = dense_release(updates, previous, dp, noise, rank)
        self.accountant.step(self.plan.noise_multiplier, self.plan.sample_rate)
        metrics = release.metrics()
        if not central:  # the clients clipped; their shares add up to this much noise
            norms = [float(u.metrics.get(keys.DP_UPDATE_NORM, 0.0)) for u in updates]
            share = self.plan.noise_multiplier * p.clip_norm / math.sqrt(p.min_clients)
            metrics.update(dp_update_norm_mean=sum(norms) / len(norms),
                           dp_update_norm_max=max(norms),
                           dp_clipped_fraction=sum(n > p.clip_norm for n in norms) / len(norms),
                           dp_noise_std=share * math.sqrt(len(updates)) / self.stats.sampled)
        sigma = metrics["dp_noise_std"]
        ratio = sigma * math.sqrt(release.released) / p.clip_norm
        if ratio > 1 and server_round == 1:
            log.warning(
                "privacy: the noise on the average is %.1f times the largest norm the average "
                "update can have (z sqrt(d) / m with d = %d released entries, m = %d); it "
                "will drown the updates. Sample more clients per round, release fewer "
                "entries (ffa, lower rank, fewer modules) or accept a larger epsilon",
                ratio, release.released, self.stats.sampled)
        metrics = {**metrics, "dp_noise_to_signal": ratio, "epsilon": self.accountant.epsilon(),
                   "delta": p.delta, "noise_multiplier": self.plan.noise_multiplier}
        round_number = 1 if self.global_adapter is None else self.global_adapter.round + 1
        return GlobalAdapter(release.factors, round=round_number), metrics

    def budget_left_for_next_round(self) -> bool:
        """False when one more release would take epsilon past the budget."""
        if self.accountant is None or self.plan is None:
            return True
        after = self.accountant.epsilon_if(self.plan.noise_multiplier, self.plan.sample_rate)
        return after <= self.privacy.budget * (1 + 1e-3)

    # ---- Strategy contract -------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.stats = RoundStats()
        nodes = self._sample_nodes(grid, self.scenario.sampled_per_round)
        self.stats.sampled = len(nodes)
        nodes = self._without_simulated_faults(nodes, server_round)
        self.stats.nodes = list(nodes)
        return self._train_messages(nodes, server_round)

    def _without_simulated_faults(self, nodes: list[int], server_round: int) -> list[int]:
        """The sampled nodes that neither drop out nor miss the deadline in this round's
        seeded draw (``fedtune.planning.faults``); the others are counted and not sent work."""
        from fedtune.planning.faults import draw_faults, faults_active

        spec = self.scenario.simulation
        by_partition = {self.node_partition[n]: n for n in nodes}
        self.stats.partitions = sorted(by_partition)
        if not faults_active(spec):
            return nodes
        train = self.scenario.train
        settings = {p: self._settings(n) for p, n in by_partition.items()}
        work = {p: float(train.steps * train.grad_accum * s.batch_size * s.seq_len)
                for p, s in settings.items()}
        faults = draw_faults(by_partition, work, {p: s.speed_factor for p, s in
                                                  settings.items()}, spec,
                             self.scenario.run.seed, server_round)
        self.stats.dropouts = len(faults.dropped)
        self.stats.stragglers += len(faults.stragglers)
        self.stats.dropped_out, self.stats.late = list(faults.dropped), list(faults.stragglers)
        if faults.lost:
            log.info("round %d: simulated faults: %d dropped out, %d past the %.0f s deadline",
                     server_round, len(faults.dropped), len(faults.stragglers),
                     spec.round_deadline)
        return [n for p, n in sorted(by_partition.items()) if p not in faults.lost]

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
                reason = checks.drop_reason(err)
                self.stats.dropped.append(f"node {node}: {reason}")
                log.warning("round %d: dropped reply from node %s: %s", server_round, node,
                            reason)
                continue
            up = keys.record_nbytes(message.content.array_records[keys.ADAPTER])
            self.stats.bytes_up += up
            dense = 4 * sum(f.A.numel() + f.B.numel() for f in update.factors.values())
            self.stats.bytes_up_dense += dense
            updates.append(update)
            # the server's own measurements last: a client's metric cannot overwrite them
            record = {**{k.replace("-", "_"): v for k, v in update.metrics.items()},
                      "round": server_round, "phase": "train", "node_id": node,
                      "client": update.client_id, "bytes_up": up,
                      "bytes_down": self.stats.down_by_node.get(node, 0),
                      "bytes_up_dense": dense}
            self.stats.client_records.append(record)
            self.on_client(record)
        updates.sort(key=lambda u: int(u.client_id))  # arrival order must not matter
        self._count_stragglers(server_round, answered)
        minimum, rule = self.minimum_replies()
        if len(updates) < minimum:
            raise RoundFailedError(
                f"round {server_round}: {len(updates)} valid replies, fewer than {rule}; "
                f"dropped: {self.stats.dropped}"
            )
        start = time.perf_counter()
        privacy_metrics: dict[str, float] = {}
        if self.plan is None:
            self.global_adapter = self.aggregator.aggregate(updates, self.global_adapter)
        else:
            self.global_adapter, privacy_metrics = self._release(updates, server_round)
        aggregate_seconds = time.perf_counter() - start
        total = sum(u.num_examples for u in updates)
        metrics = MetricRecord({
            "train-loss": sum(u.metrics[keys.TRAIN_LOSS] * u.num_examples for u in updates) / total,
            "num-clients": len(updates),
            "seconds-aggregate": aggregate_seconds,
            **{k.replace("_", "-"): float(v) for k, v in self.aggregator.metrics().items()},
            **{k.replace("_", "-"): float(v) for k, v in privacy_metrics.items()},
            **_sample_epsilon(updates),
        })
        return keys.factors_to_record(self.global_adapter.factors), metrics

    def _sender(self, message: Message) -> int:
        """The node a reply is about (for an error the SuperLink sent in its place too)."""
        node = message.metadata.src_node_id
        if node in self.node_partition:
            return node
        return self.stats.message_node.get(message.metadata.reply_to_message_id, node)

    def _count_stragglers(self, server_round: int, answered: set[int]) -> None:
        """Sampled nodes that sent nothing before the round deadline (slow, crashed or
        disconnected): dropped from the round and counted."""
        timeout = self.scenario.federation.round_timeout
        for node in self.stats.nodes:
            if node not in answered:
                self.stats.stragglers += 1
                self.stats.dropped.append(
                    f"node {node}: no reply within federation.round_timeout = {timeout:g} s")
                log.warning("round %d: node %s sent no reply before the deadline",
                            server_round, node)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        every = self.scenario.federation.eval_every
        last = server_round == self.scenario.run.rounds
        if server_round % every and not last and server_round != 0:
            return []
        self.discover(grid)
        chosen = self.eval_partitions()
        return self._eval_messages(sorted(n for n, p in self.node_partition.items()
                                          if chosen is None or p in chosen), server_round)

    def eval_partitions(self) -> set[int] | None:
        """The clients that evaluate the global adapter: a fixed seeded subset of
        ``federation.eval_clients`` (the same every round, so rounds compare), or all."""
        count = self.scenario.federation.eval_clients
        if not count:
            return None
        population = range(self.scenario.data.num_clients)
        return set(stream(self.scenario.run.seed, "eval").sample(population, count))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        loss_sum, tokens = 0.0, 0
        for message in replies:
            if message.has_error():
                log.warning("round %d: evaluation failed on node %s: %s", server_round,
                            message.metadata.src_node_id, message.error.reason)
                continue
            try:
                loss, count, m = checks.eval_numbers(message.content)
            except Exception as err:  # noqa: BLE001 - one reply's failure is that reply's
                log.warning("round %d: ignored the evaluation of node %s: %s", server_round,
                            message.metadata.src_node_id, checks.drop_reason(err))
                continue
            loss_sum += loss * count
            tokens += count
            self.on_client({**{k.replace("-", "_"): v for k, v in m.items()},
                            "round": server_round, "phase": "eval",
                            "node_id": message.metadata.src_node_id})
        if tokens == 0:
            return None
        return MetricRecord({"eval-loss": loss_sum / tokens, "eval-tokens": tokens})

    def summary(self) -> None:
        log.info("fedtune strategy: aggregator=%s rounds=%d clients/round=%d",
                 self.aggregator.name, self.scenario.run.rounds, self.scenario.sampled_per_round)

    # ---- the loop ----------------------------------------------------------------------
    def _evaluate(self, grid: Grid, server_round: int) -> float | None:
        timeout = self.scenario.federation.round_timeout
        messages = list(self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
        if not messages:
            return None
        replies = grid.send_and_receive(messages, timeout=timeout)
        metrics = self.aggregate_evaluate(server_round, replies)
        return None if metrics is None else float(metrics["eval-loss"])

    def run(self, grid: Grid, initial_eval: bool = True, first_round: int = 1) -> Result:
        """Rounds ``first_round``.. (2 and on after a resume): train, aggregate, evaluate;
        report each round to ``on_round``."""
        result = Result()
        timeout = self.scenario.federation.round_timeout
        if initial_eval and first_round == 1:
            loss = self._evaluate(grid, 0)
            self.on_round({"round": 0, "eval_loss": loss})
        for server_round in range(first_round, self.scenario.run.rounds + 1):
            if not self.budget_left_for_next_round():
                assert self.accountant is not None
                self.stopped = (f"privacy budget: round {server_round} would take epsilon past "
                                f"{self.privacy.budget:g} (spent {self.accountant.epsilon():.4g})")
                log.warning("stopping before round %d: %s", server_round, self.stopped)
                break
            start = time.perf_counter()
            messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(),
                                                 grid))
            replies = grid.send_and_receive(messages, timeout=timeout)
            self.stats.message_node = {m.metadata.message_id: m.metadata.dst_node_id
                                       for m in messages}
            train_done = time.perf_counter()
            arrays, train_metrics = self.aggregate_train(server_round, replies)
            aggregate_done = time.perf_counter()
            eval_loss = self._evaluate(grid, server_round)
            result.arrays = arrays
            record = {
                "round": server_round,
                "train_loss": float(train_metrics["train-loss"]),
                "eval_loss": eval_loss,
                "bytes_up": self.stats.bytes_up,
                "bytes_down": self.stats.bytes_down,
                "bytes_up_dense": self.stats.bytes_up_dense,
                "clients_sampled": self.stats.sampled,
                "clients_replied": int(train_metrics["num-clients"]),
                "dropped": list(self.stats.dropped),
                "refused_names": self.name_keys.take_refused() if self.name_keys else [],
                "stragglers": self.stats.stragglers,
                "dropouts": self.stats.dropouts,
                "sampled_partitions": self.stats.partitions,
                "dropped_out": self.stats.dropped_out,
                "late": self.stats.late,
                **{k.replace("-", "_"): v for k, v in train_metrics.items()
                   if k not in ("train-loss", "num-clients", "seconds-aggregate")},
                "seconds": time.perf_counter() - start,
                "seconds_train_phase": train_done - start,
                "seconds_aggregate": aggregate_done - train_done,
                "seconds_eval_phase": time.perf_counter() - aggregate_done,
                **_client_time_breakdown(self.stats.client_records),
            }
            self.on_round(record)
        return result


    def announce_end(self, grid: Grid, last_round: int) -> int:
        """Tell every connected deployed client that the run is over and hand it the final
        global adapter (the exported tensors), so an application embedding a client can
        use the result and stop; returns how many acknowledged. Simulated clients have
        nothing to keep and are not told."""
        named = set(self.names.values())
        live = set(grid.get_node_ids())
        nodes = sorted(n for n, p in self.node_partition.items() if p in named and n in live)
        if not nodes or self.global_adapter is None:
            return 0
        payload = keys.state_to_record(scale_folded_state_dict(self.global_adapter.factors))
        messages = [Message(content=keys.make_content(payload, {keys.ROUND: last_round,
                                                                keys.FINAL: True}),
                            message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        timeout = min(self.scenario.federation.round_timeout, 60.0)
        replies = grid.send_and_receive(messages, timeout=timeout)
        told = sum(not r.has_error() for r in replies)
        log.info("fedtune: %d of %d connected clients received the final adapter",
                 told, len(nodes))
        return told

    # ---- checkpoint / resume --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed server needs to go on exactly where this one stopped (see
        ``fedtune.flower.checkpoint``); node ids are not kept: they change on restart."""
        from fedtune.flower.checkpoint import adapter_to_state, rng_to_state

        return {
            "global": adapter_to_state(self.global_adapter),
            "rng": rng_to_state(self.rng.getstate()),
            "expected": {n: list(v) for n, v in self.expected.items()},
            "pruned_rank": dict(self.pruned_rank),
            "names": dict(self.names),
            "declared": dict(self.declared),
            "name_keys": None if self.name_keys is None else self.name_keys.state(),
            "accountant": None if self.accountant is None else self.accountant.state(),
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from fedtune.flower.checkpoint import adapter_from_state, rng_from_state

        self.global_adapter = adapter_from_state(state["global"])
        self.rng.setstate(rng_from_state(state["rng"]))
        saved = {n: (int(v[0]), int(v[1])) for n, v in state["expected"].items()}
        if saved and saved != self.expected:  # shapes come from the base model's config
            from fedtune.flower.checkpoint import CheckpointError

            raise CheckpointError("the checkpoint's adapted modules are not the base "
                                  "model's; it was made with another model")
        self.pruned_rank = {int(k): int(v) for k, v in state["pruned_rank"].items()}
        self.names = {str(k): int(v) for k, v in state["names"].items()}
        self.declared = {int(k): str(v) for k, v in state["declared"].items()}
        if state.get("name_keys") is not None:
            self.name_keys = NameKeys(state["name_keys"])
        if self.declared:
            self._apply_declared_profiles()
        if state["accountant"] is not None:
            saved = state["accountant"]
            self.accountant = PrivacyAccountant(float(saved["delta"]), str(saved["kind"]),
                                                [tuple(h) for h in saved["history"]])
        self.stopped = state["stopped"]
        self.node_partition = {}


def update_norm(factors: dict[str, LoraFactors], start: dict[str, LoraFactors]) -> float:
    """L2 norm of a reply's move from where it started, over every factor it sent."""
    total = 0.0
    for name, f in factors.items():
        s = start[name]
        total += float((f.A - s.A[: f.rank]).pow(2).sum() + (f.B - s.B[:, : f.rank]).pow(2).sum())
    return math.sqrt(total)


def _sample_epsilon(updates: list[ClientUpdate]) -> dict[str, float]:
    """DP-SGD: the largest per-client epsilon reported this round."""
    values = [float(u.metrics[keys.SAMPLE_EPSILON]) for u in updates
              if keys.SAMPLE_EPSILON in u.metrics]
    return {"sample-epsilon-max": max(values)} if values else {}


def sent_masks(masks: dict[str, Tensor | None], factors: dict[str, LoraFactors]
               ) -> dict[str, LoraMask] | None:
    """Per module, which entries of A and B a packed reply actually carried; None when
    every tensor was sent dense (then it merges exactly like an uncompressed reply)."""
    out = {}
    for name, f in factors.items():
        a, b = masks.get(name + A_SUFFIX), masks.get(name + B_SUFFIX)
        if a is None and b is None:
            continue
        full = LoraMask.full(f)
        out[name] = LoraMask(A=full.A if a is None else a, B=full.B if b is None else b)
    return out or None


def short_reason(reason: str | None, limit: int = 300) -> str:
    """The client's own exception message out of an engine's wrapped traceback."""
    text = reason or "unknown error"
    marker = "Message: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    text = text.strip().splitlines()[0] if text.strip() else text
    return text[:limit].rstrip("'>")


def _client_time_breakdown(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean per-client seconds for model load, training and serialisation."""
    if not records:
        return {}
    out = {}
    for key in ("seconds_load", "seconds_train", "seconds_codec", "peak_memory_mb"):
        values = [float(r[key]) for r in records if key in r]
        if values:
            out[f"client_{key}_mean" if key != "peak_memory_mb" else "peak_memory_mb_max"] = (
                sum(values) / len(values) if key != "peak_memory_mb" else max(values)
            )
    return out
