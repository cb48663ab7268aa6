"""Who takes part in a federation: which node is which client, with which settings.

Node ids are random per run (and change when a client restarts), so everything the
server decides is keyed by partition: a simulated node says its partition (or the
engine's own mapping is read, see ``fedtune.flower.simulated_nodes``), a deployed client
says its name, and names get partitions in order. Sampling, simulated faults and the
evaluation subset are seeded from ``run.seed`` (``fedtune.core.seeds``), so a seeded run
picks the same clients every time, and a resumed one (``state``/``load_state``) goes on
with the same draws. Under client-level DP the sample is Poisson
(``fedtune.privacy.sampling``) and drawn from OS entropy unless the run is a
reproducible experiment: who was sampled is then a secret the server keeps to itself.
"""

from __future__ import annotations

import hashlib
import logging
import random
import secrets
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedtune.config import ConfigError, Scenario
from fedtune.core.seeds import sampler, stream
from fedtune.flower import messages as keys
from fedtune.flower.identity import Claim, NameKeys
from fedtune.flower.polling import exchange
from fedtune.planning.client_settings import ClientSettings, client_settings
from fedtune.planning.faults import RoundFaults
from fedtune.privacy.sampling import PoissonCohort, poisson_cohort

log = logging.getLogger("fedtune")


class RoundFailedError(RuntimeError):
    """Too few clients or valid replies for the configured minimum."""


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


def hidden_name(name: str) -> str:
    """What a server under client-level DP keeps of a client's name: a digest, so that
    no name is written to the checkpoint, the run record or the log (anyone who guesses
    a name can still check it; the digest only keeps the files from spelling it)."""
    return "name-sha256:" + hashlib.sha256(name.encode()).hexdigest()[:16]


def check_distributed_ranks(scenario: Scenario, ranks: Iterable[int]) -> None:
    """Distributed DP needs one rank: each client noises only the components of its own
    rank, so in a release of the population's rank the components above the smallest
    would carry less noise than z C (only the wider clients' shares)."""
    p = scenario.privacy
    found = sorted(set(ranks))
    if p.client_level and p.mode == "distributed" and len(found) > 1:
        raise ConfigError(
            f"privacy.mode = 'distributed' needs one LoRA rank across clients, got {found}: "
            "each client noises only the components of its own rank, so in a release of "
            f"rank {found[-1]} the components above rank {found[0]} would carry less noise "
            "than z C; use mode = 'central' or one rank (clients.rank_policy = 'min')")


def client_sampler(scenario: Scenario) -> random.Random:
    """Who takes part in a round: the run's seeded stream, or, under client-level DP
    (unless ``privacy.reproducible``), the OS's generator, so that knowing the seed
    reveals nothing about who was sampled."""
    privacy = scenario.privacy
    if privacy.client_level and privacy.os_entropy:
        return secrets.SystemRandom()
    return sampler(scenario.run.seed)


class Population:
    """The clients of one run: node <-> partition, names, declared profiles, settings."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.settings = client_settings(scenario)
        self.node_partition: dict[int, int] = {}
        #: deployment: client name -> partition (stable across client restarts and resumes)
        self.names: dict[str, int] = {}
        #: deployment: the profile (TOML text) each partition declared when it first joined
        self.declared: dict[int, str] = {}
        #: deployment with node authentication: which key owns which name
        self.name_keys: NameKeys | None = NameKeys() if scenario.server.auth_keys else None
        self.pruned_rank: dict[int, int] = {}  # partition -> rank after HetLoRA self-pruning
        self.rng = client_sampler(scenario)

    # ---- discovery -----------------------------------------------------------------------
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
        replies = exchange(grid, queries, self.scenario.federation.round_timeout)
        named = self._read_identities(replies)
        if named and self.name_keys is not None:
            held = {n.node_id: bytes(n.public_key) for n in grid.get_nodes()}
            named = self.name_keys.admit(named, held)
        if named:
            self.register_named(named)

    def _read_identities(self, replies: Iterable[Message]) -> dict[int, Claim]:
        """Simulated nodes are placed at the partition they report; deployed clients'
        claims (name, profile) are returned for :meth:`register_named`."""
        named: dict[int, Claim] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not say who it is: %s", node, reply.error.reason)
                continue
            identity = reply.content.config_records.get(keys.IDENTITY)
            if identity is not None:  # a deployed client: known by its name
                name = str(identity[keys.CLIENT_NAME])
                if self.scenario.privacy.client_level:  # known by its digest only
                    name = hidden_name(name)
                named[node] = (name, str(identity.get(keys.CLIENT_PROFILE, "")))
                continue
            partition = int(reply.content.metric_records[keys.METRICS][keys.PARTITION])
            if not 0 <= partition < len(self.settings):
                log.warning("node %s reports partition %d, outside 0..%d; ignored",
                            node, partition, len(self.settings) - 1)
                continue
            self.node_partition[node] = partition
        return named

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

    def register_named(self, named: dict[int, Claim]) -> None:
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
        """Settings from the profiles deployed clients declared (see ``register_named``)."""
        import tomllib

        from fedtune.planning.client_settings import check_ranks, settings_from_profiles
        from fedtune.planning.profiles import DeviceProfile

        profiles = [None] * self.scenario.data.num_clients
        for partition, text in self.declared.items():
            profiles[partition] = DeviceProfile.from_dict(
                tomllib.loads(text), origin=f"the profile client {partition} declared")
        settings = settings_from_profiles(self.scenario, profiles)
        check_ranks(self.scenario, [s.rank for s in settings])
        check_distributed_ranks(self.scenario, [s.rank for s in settings])
        self.settings = tuple(settings)

    # ---- who takes part --------------------------------------------------------------------
    def available(self, grid: Grid) -> dict[int, int]:
        """partition -> node of the identified clients connected now (:meth:`discover`
        first); RoundFailedError when fewer than the minimum of replies."""
        live = set(grid.get_node_ids())
        by_partition = {p: n for n, p in self.node_partition.items() if n in live}
        minimum, rule = self.minimum_replies()
        if len(by_partition) < minimum:
            raise RoundFailedError(
                f"{len(by_partition)} identified clients are connected, fewer than {rule}")
        return by_partition

    def poisson_sample(self, by_partition: dict[int, int], expected: int
                       ) -> tuple[list[int], PoissonCohort]:
        """Client-level DP: every available client (``available``'s partition -> node)
        joins with probability q = expected / available (a shrinking population raises q;
        the caller charges the accountant with it). The cohort holds partitions and must
        never be written anywhere."""
        cohort = poisson_cohort(list(by_partition), expected, self.rng)
        return [by_partition[p] for p in cohort.members], cohort

    def sample(self, grid: Grid, wanted: int) -> list[int]:
        """Seeded sample of clients by partition id (node ids are random per run) among
        the identified nodes connected now; fewer than ``wanted`` when some are gone (a
        round still needs its minimum of replies)."""
        by_partition = self.available(grid)
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
        privacy = self.scenario.privacy
        if privacy.client_level and privacy.min_clients > minimum:
            minimum = privacy.min_clients
            rule = f"privacy.min_clients = {minimum}"
        return minimum, rule

    def settings_for(self, node: int) -> ClientSettings:
        """The node's profile settings, with its self-pruned rank once it has pruned
        (alpha follows the rank so the LoRA scale alpha / r is unchanged)."""
        settings = self.settings[self.node_partition[node]]
        rank = self.pruned_rank.get(settings.partition)
        if rank is None:
            return settings
        return replace(settings, rank=rank, alpha=settings.alpha * rank / settings.rank)

    def simulated_faults(self, nodes: list[int], server_round: int) -> RoundFaults | None:
        """This round's seeded draw of dropouts and missed deadlines among the sampled
        ``nodes`` (``fedtune.planning.faults``), or None when no fault is simulated."""
        from fedtune.planning.faults import draw_faults, faults_active

        spec = self.scenario.simulation
        if not faults_active(spec):
            return None
        train = self.scenario.train
        settings = {self.node_partition[n]: self.settings_for(n) for n in nodes}
        work = {p: float(train.steps * train.grad_accum * s.batch_size * s.seq_len)
                for p, s in settings.items()}
        speed = {p: s.speed_factor for p, s in settings.items()}
        return draw_faults(settings, work, speed, spec, self.scenario.run.seed, server_round)

    def eval_partitions(self) -> set[int] | None:
        """The clients that evaluate the global adapter: a fixed seeded subset of
        ``federation.eval_clients`` (the same every round, so rounds compare), or all."""
        count = self.scenario.federation.eval_clients
        if not count:
            return None
        population = range(self.scenario.data.num_clients)
        return set(stream(self.scenario.run.seed, "eval").sample(population, count))

    def eval_nodes(self) -> list[int]:
        chosen = self.eval_partitions()
        return sorted(n for n, p in self.node_partition.items()
                      if chosen is None or p in chosen)

    def named_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes of deployed (named) clients."""
        named = set(self.names.values())
        live = set(grid.get_node_ids())
        return sorted(n for n, p in self.node_partition.items() if p in named and n in live)

    # ---- checkpoint -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a resumed server needs (node ids are not kept: they change on restart)."""
        from fedtune.flower.checkpoint import rng_to_state

        secret = isinstance(self.rng, secrets.SystemRandom)  # no state to keep
        return {"rng": None if secret else rng_to_state(self.rng.getstate()),
                "pruned_rank": dict(self.pruned_rank),
                "names": dict(self.names),
                "declared": dict(self.declared),
                "name_keys": None if self.name_keys is None else self.name_keys.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        from fedtune.flower.checkpoint import rng_from_state

        if state["rng"] is not None and not isinstance(self.rng, secrets.SystemRandom):
            self.rng.setstate(rng_from_state(state["rng"]))
        self.pruned_rank = {int(k): int(v) for k, v in state["pruned_rank"].items()}
        self.names = {str(k): int(v) for k, v in state["names"].items()}
        self.declared = {int(k): str(v) for k, v in state["declared"].items()}
        if state.get("name_keys") is not None:
            self.name_keys = NameKeys(state["name_keys"])
        if self.declared:
            self._apply_declared_profiles()
        self.node_partition = {}
