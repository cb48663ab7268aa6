"""Scenario files: TOML validated into typed, frozen config objects.

A scenario has one table per section (``[run]``, ``[model]``, ``[lora]``, ``[data]``,
``[train]``, ``[federation]``, ``[simulation]``). Each section is a dataclass; the
section's own ``__post_init__`` checks values, this module checks keys and types, so
every error names the key, the value and what is allowed before any work starts.
The same keys can be overridden as ``section.key=value`` strings (``--set``) and
travel to Flower apps as a flat run config.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fedtune.aggregation.sparse import MERGES
from fedtune.aggregation.zeropad import PADDINGS
from fedtune.core.compress import SELECTIONS, VALUE_CODECS, CompressionSpec
from fedtune.model.loading import ModelSpec
from fedtune.model.lora import LoraSpec
from fedtune.privacy.accountant import (
    ACCOUNTANTS,
    BudgetError,
    affordable_releases,
    epsilon_after,
    noise_multiplier_for,
)
from fedtune.train.local import TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
SCENARIO_DIR = REPO_ROOT / "simulations"
DEFAULT_SCENARIO = SCENARIO_DIR / "default.toml"


class ConfigError(ValueError):
    """A scenario key or value is wrong; the message says which and what is allowed."""


@dataclass(frozen=True)
class RunSpec:
    name: str = "fedtune"
    seed: int = 0
    rounds: int = 3
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "rounds", self.rounds, "an integer >= 1")
        _require(bool(self.name.strip()), "name", self.name, "a non-empty string")


@dataclass(frozen=True)
class DataSpec:
    source: str = "shakespeare"
    path: str = ""
    num_clients: int = 8
    min_lines: int = 64
    eval_fraction: float = 0.1
    seq_len: int = 128
    max_samples_per_client: int = 0  # 0 = no cap
    max_eval_sequences: int = 0  # 0 = all held-out sequences
    #: "natural" (roles, users, JSONL clients), "iid", or "dirichlet" (label skew)
    partition: str = "natural"
    dirichlet_alpha: float = 0.5  # partition = "dirichlet": concentration; small = skewed
    group_by: str = ""  # the labels of the skew: genre|play|character, sender, client

    def __post_init__(self) -> None:
        _require(self.source in ("shakespeare", "chitchat", "jsonl"), "source", self.source,
                 "one of 'shakespeare', 'chitchat', 'jsonl'")
        _require(self.partition in ("natural", "iid", "dirichlet"), "partition",
                 self.partition, "one of 'natural', 'iid', 'dirichlet'")
        _require(self.dirichlet_alpha > 0, "dirichlet_alpha", self.dirichlet_alpha,
                 "a number > 0 (small = each client holds few groups)")
        allowed = {"shakespeare": ("", "genre", "play", "character"),
                   "chitchat": ("", "sender"), "jsonl": ("", "client")}[self.source]
        _require(self.group_by in allowed, "group_by", self.group_by,
                 f"one of {', '.join(repr(a) for a in allowed if a)} for source "
                 f"{self.source!r} (or \"\" for its default)")
        _require(self.source != "jsonl" or bool(self.path), "path", self.path,
                 "a file or directory of JSONL records when source = 'jsonl'")
        _require(self.num_clients >= 1, "num_clients", self.num_clients, "an integer >= 1")
        _require(self.min_lines >= 1, "min_lines", self.min_lines, "an integer >= 1")
        _require(0.0 < self.eval_fraction < 1.0, "eval_fraction", self.eval_fraction,
                 "a number in (0, 1)")
        _require(self.seq_len >= 8, "seq_len", self.seq_len, "an integer >= 8")
        _require(self.max_samples_per_client >= 0, "max_samples_per_client",
                 self.max_samples_per_client, "an integer >= 0 (0 = no cap)")
        _require(self.max_eval_sequences >= 0, "max_eval_sequences", self.max_eval_sequences,
                 "an integer >= 0 (0 = all)")


#: Aggregators that add up client updates entry by entry, so entries can be merged
#: sparsity-aware (mask-aware mean) or by TIES.
MERGING_AGGREGATORS = ("fedavg", "zeropad", "hetlora", "ffa")
#: Aggregators that zero-pad mixed ranks, and so take the ``padding`` option.
PADDING_AGGREGATORS = ("zeropad", "hetlora")


@dataclass(frozen=True)
class FederationSpec:
    aggregator: str = "fedavg"
    clients_per_round: int = 0  # 0 = every client, every round
    min_clients: int = 1
    round_timeout: float = 3600.0
    eval_every: int = 1
    rank_budget: int = 64  # flora: rank the global adapter is recompressed to each round
    prune_gamma: float = 0.0  # hetlora: rank self-pruning decay factor in (0, 1); 0 = off
    flora_init: str = "fresh"  # flora: clients' LoRA starts "fresh" or from the "global" top
    merge: str = "mean"  # fedavg / zeropad / hetlora / ffa: "mean" (mask-aware) or "ties"
    ties_density: float = 0.2  # merge = "ties": fraction of each update's entries kept
    padding: str = "zeros"  # zeropad / hetlora: "zeros" (classic) or "skip" (see ZeroPad)
    # reject a reply whose update (final LoRA minus its start) has a larger L2 norm; 0 = off
    max_update_norm: float = 0.0
    # drop a reply claiming more training examples (its weight in every weighted mean);
    # 0 = no bound. Why 100,000 and why dropped: fedtune.flower.replies.checked_examples
    max_examples: int = 100_000
    # clients that evaluate the global adapter (a fixed seeded subset); 0 = every client
    eval_clients: int = 0

    def __post_init__(self) -> None:
        from fedtune.aggregation import available

        _require(self.aggregator in available(), "aggregator", self.aggregator,
                 f"one of {', '.join(available())}")
        _require(self.clients_per_round >= 0, "clients_per_round", self.clients_per_round,
                 "an integer >= 0 (0 = all clients)")
        _require(self.min_clients >= 1, "min_clients", self.min_clients, "an integer >= 1")
        _require(self.round_timeout > 0, "round_timeout", self.round_timeout, "seconds > 0")
        _require(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1")
        _require(self.eval_clients >= 0, "eval_clients", self.eval_clients,
                 "an integer >= 0 (0 = every client)")
        _require(self.rank_budget >= 1, "rank_budget", self.rank_budget, "an integer >= 1")
        _require(self.flora_init in ("fresh", "global"), "flora_init", self.flora_init,
                 "'fresh' (a new LoRA on top of the frozen global adapter each round) or "
                 "'global' (start from the global adapter's top components)")
        _require(0.0 <= self.prune_gamma < 1.0, "prune_gamma", self.prune_gamma,
                 "a number in [0, 1) (0 = no rank self-pruning)")
        _require(self.prune_gamma == 0.0 or self.aggregator == "hetlora", "prune_gamma",
                 self.prune_gamma, "0 unless aggregator = 'hetlora' (HetLoRA's rank "
                 "self-pruning)")
        _require(self.merge in MERGES, "merge", self.merge,
                 "'mean' (each entry averaged over the clients that sent it) or 'ties' "
                 "(trim, elect a sign, average the entries that agree)")
        _require(self.merge == "mean" or self.aggregator in MERGING_AGGREGATORS, "merge",
                 self.merge, f"'mean' unless aggregator is one of "
                 f"{', '.join(MERGING_AGGREGATORS)} (TIES merges additive updates; "
                 f"{self.aggregator} combines factors another way)")
        _require(0.0 < self.ties_density <= 1.0, "ties_density", self.ties_density,
                 "a number in (0, 1]")
        _require(self.padding in PADDINGS, "padding", self.padding,
                 "'zeros' (padding counts as zeros) or 'skip' (each rank component averaged "
                 "over the clients that have it)")
        _require(self.padding == "zeros" or self.aggregator in PADDING_AGGREGATORS,
                 "padding", self.padding, "'zeros' unless aggregator is zeropad or hetlora")
        _require(self.max_update_norm >= 0, "max_update_norm", self.max_update_norm,
                 "a number >= 0 (0 = no bound)")
        _require(self.max_examples >= 0, "max_examples", self.max_examples,
                 "an integer >= 0 (0 = no bound on the num-examples a reply may claim)")

    def aggregator_options(self) -> dict[str, Any]:
        """Options of the chosen aggregator that come from scenario keys."""
        if self.aggregator == "flora":
            return {"rank_budget": self.rank_budget, "init": self.flora_init}
        options: dict[str, Any] = {}
        if self.aggregator in MERGING_AGGREGATORS:
            options.update(merge=self.merge, ties_density=self.ties_density)
        if self.aggregator in PADDING_AGGREGATORS:
            options.update(padding=self.padding)
        return options


@dataclass(frozen=True)
class ClientsSpec:
    """Device profiles per client: a list cycled over clients, or a mix by proportion.

    Empty (the default): every client uses ``[lora]``, ``[model]`` and ``[train]`` as
    given. With profiles, each client's rank, alpha, quantization, batch size and sequence
    length come from its profile (``rank = "auto"`` asks the memory estimator).
    """

    profiles: tuple[str, ...] = ()
    mix: dict[str, float] = field(default_factory=dict)
    # "profile": each client trains its profile's rank; "min": every client trains the
    # smallest of them; "auto": "min" for aggregators that need equal ranks (fedavg, ffa),
    # else "profile".
    rank_policy: str = "auto"

    def __post_init__(self) -> None:
        _require(not (self.profiles and self.mix), "profiles", list(self.profiles),
                 "either clients.profiles or clients.mix, not both")
        _require(self.rank_policy in ("auto", "profile", "min"), "rank_policy",
                 self.rank_policy, "one of 'auto', 'profile', 'min'")

    def __hash__(self) -> int:
        return hash((self.profiles, tuple(sorted(self.mix.items())), self.rank_policy))

    @property
    def enabled(self) -> bool:
        return bool(self.profiles or self.mix)


@dataclass(frozen=True)
class CompressionConfig:
    """What travels: sparse uploads with error feedback, fp16 / int8 values each way.

    ``upload_density`` keeps that fraction of each tensor's update entries (largest
    magnitudes; 1 = dense); what is left out stays in the client's residual and is added
    to its next update when ``error_feedback`` is on. ``upload_values`` and
    ``download_values`` are fp32, fp16 or int8 (blockwise absmax, ``block_size`` values
    per block). Evaluation payloads always travel in fp32: they are the exported adapter.
    ``selection`` = "tensor" keeps the top entries of each tensor; "product" keeps, per
    module, the entries of A and B that move B @ A most (same count in all).
    """

    upload_density: float = 1.0
    upload_values: str = "fp32"
    download_values: str = "fp32"
    error_feedback: bool = True
    block_size: int = 256
    selection: str = "tensor"

    def __post_init__(self) -> None:
        codecs = f"one of {', '.join(VALUE_CODECS)}"
        _require(0.0 < self.upload_density <= 1.0, "upload_density", self.upload_density,
                 "a number in (0, 1] (1 = dense)")
        _require(self.upload_values in VALUE_CODECS, "upload_values", self.upload_values,
                 codecs)
        _require(self.download_values in VALUE_CODECS, "download_values",
                 self.download_values, codecs)
        _require(self.block_size >= 1, "block_size", self.block_size, "an integer >= 1")
        _require(self.selection in SELECTIONS, "selection", self.selection,
                 "'tensor' (top-k of each tensor) or 'product' (per module, the entries of "
                 "A and B with the largest effect on B @ A)")

    def upload(self) -> CompressionSpec:
        return CompressionSpec(self.upload_density, self.upload_values, self.block_size)

    def download(self) -> CompressionSpec:
        return CompressionSpec(1.0, self.download_values, self.block_size)


#: Client-level DP: where the Gaussian noise is added.
DP_MODES = ("none", "central", "distributed")
#: Aggregators with a client-level DP mechanism, and its form (see fedtune.privacy.mechanism).
DP_FORMS = {"fedavg": "factor", "zeropad": "factor", "ffa": "factor", "flora": "dense",
            "flexlora": "dense"}
#: Aggregators that only add up client updates: the ones secure aggregation could serve.
ADDITIVE_AGGREGATORS = ("fedavg", "zeropad", "ffa")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: client-level (clip C, noise z * C / m) and sample-level DP-SGD.

    ``mode``: "none", "central" (the server clips and adds the noise) or "distributed"
    (each client clips its update and adds its share of the noise; the shares of at least
    ``min_clients`` clients add up to the full noise). Give either ``noise_multiplier``
    or ``target_epsilon`` (then z is computed for the planned rounds). ``max_epsilon``
    (default: the target) is the budget; ``on_budget`` = "refuse" rejects a plan that
    would exceed it, "stop" runs until the next round would. ``secure_noise`` draws noise
    from OS entropy instead of the run seed. ``sample_noise_multiplier`` > 0 turns on
    DP-SGD on every client with per-sequence clip norm ``sample_clip_norm``.
    """

    mode: str = "none"
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    max_epsilon: float = 0.0
    on_budget: str = "refuse"
    accountant: str = "rdp"
    min_clients: int = 2
    secure_noise: bool = False
    secure_aggregation: bool = False
    sample_noise_multiplier: float = 0.0
    sample_clip_norm: float = 1.0

    def __post_init__(self) -> None:
        _require(self.mode in DP_MODES, "mode", self.mode, f"one of {', '.join(DP_MODES)}")
        _require(self.clip_norm > 0, "clip_norm", self.clip_norm,
                 "a number > 0 (the L2 bound on one client's update)")
        _require(0.0 < self.delta < 1.0, "delta", self.delta,
                 "a number in (0, 1), well below 1 / (number of clients)")
        _require(self.noise_multiplier >= 0, "noise_multiplier", self.noise_multiplier,
                 "a number >= 0")
        _require(self.target_epsilon >= 0, "target_epsilon", self.target_epsilon,
                 "a number > 0, or 0 to give noise_multiplier instead")
        _require(self.max_epsilon >= 0, "max_epsilon", self.max_epsilon,
                 "a number > 0, or 0 for no budget (the target when target_epsilon is set)")
        _require(self.on_budget in ("refuse", "stop"), "on_budget", self.on_budget,
                 "'refuse' (do not start a run that would exceed the budget) or 'stop' "
                 "(stop before the round that would)")
        _require(self.accountant in ACCOUNTANTS, "accountant", self.accountant,
                 f"one of {', '.join(ACCOUNTANTS)}")
        _require(self.min_clients >= 1, "min_clients", self.min_clients, "an integer >= 1")
        _require(self.sample_noise_multiplier >= 0, "sample_noise_multiplier",
                 self.sample_noise_multiplier, "a number >= 0 (0 = no DP-SGD)")
        _require(self.sample_clip_norm > 0, "sample_clip_norm", self.sample_clip_norm,
                 "a number > 0")
        if self.mode != "none":
            _require(not (self.noise_multiplier and self.target_epsilon), "target_epsilon",
                     self.target_epsilon, "0 when noise_multiplier is given (one or the other)")
            _require(bool(self.noise_multiplier or self.target_epsilon), "noise_multiplier",
                     self.noise_multiplier, "a number > 0, or a target_epsilon, when mode = "
                     f"{self.mode!r} (clipping without noise is not differential privacy)")

    @property
    def client_level(self) -> bool:
        return self.mode != "none"

    @property
    def sample_level(self) -> bool:
        return self.sample_noise_multiplier > 0

    @property
    def budget(self) -> float:
        """The epsilon the run may spend (inf when unbounded)."""
        return self.max_epsilon or self.target_epsilon or float("inf")


@dataclass(frozen=True)
class PrivacyPlan:
    """Client-level DP for a whole run: z, the client sampling rate q and epsilon after
    the planned rounds (from the accountant, at the configured delta)."""

    noise_multiplier: float
    sample_rate: float
    rounds: int
    planned_epsilon: float


@dataclass(frozen=True)
class SimulationSpec:
    backend: str = "ray"
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    #: probability that a sampled client drops out of a round (seeded per round)
    dropout: float = 0.0
    #: seconds of simulated device time a round allows; a slower client is a straggler
    #: and its update is not used (0 = no deadline). Device time = the client's tokens of
    #: work / (reference_tokens_per_s x its profile's speed_factor) x seeded jitter
    round_deadline: float = 0.0
    reference_tokens_per_s: float = 1000.0
    time_jitter: float = 0.25  # sigma of the lognormal jitter of device time
    #: the Ray cluster the engine runs on: "" = a private Ray instance on this machine
    #: (unless RAY_ADDRESS is set), "auto" = the cluster this machine is a node of (or
    #: RAY_ADDRESS), "HOST:PORT" = that cluster's head, "local" = private, whatever
    #: RAY_ADDRESS says. See docs/cluster.md and fedtune.runs.cluster.
    ray_address: str = ""

    def __post_init__(self) -> None:
        _require(self.backend == "ray", "backend", self.backend, "'ray'")
        _require(_is_ray_address(self.ray_address), "ray_address", self.ray_address,
                 "'' (a private Ray instance, or RAY_ADDRESS), 'auto' (the cluster this "
                 "machine belongs to), 'local', or the head's HOST:PORT (ray://HOST:PORT "
                 "for Ray Client)")
        _require(self.cpus_per_client > 0, "cpus_per_client", self.cpus_per_client, "> 0")
        _require(self.gpus_per_client >= 0, "gpus_per_client", self.gpus_per_client, ">= 0")
        _require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a probability in [0, 1)")
        _require(self.round_deadline >= 0, "round_deadline", self.round_deadline,
                 "seconds >= 0 (0 = no deadline)")
        _require(self.reference_tokens_per_s > 0, "reference_tokens_per_s",
                 self.reference_tokens_per_s, "a number > 0")
        _require(self.time_jitter >= 0, "time_jitter", self.time_jitter, "a number >= 0")


def _is_ray_address(text: str) -> bool:
    """"", "auto", "local", HOST:PORT or ray://HOST:PORT (what ``ray.init`` accepts)."""
    if text in ("", "auto", "local"):
        return True
    host, _, port = text.removeprefix("ray://").rpartition(":")
    return (bool(host) and not any(c.isspace() or c in "/@" for c in host)
            and port.isdigit() and 0 < int(port) < 65536)


@dataclass(frozen=True)
class ServerSpec:
    """Where ``fedtune server`` listens and how it is secured (ignored by simulations).

    TLS needs all three certificate files; ``insecure = true`` is the only way to run
    without them. ``auth_keys`` (a file of OpenSSH ECDSA public keys, one per line) turns on
    Flower's node authentication: only clients holding one of those keys may join, and a
    client's name is bound to its key. A TLS server without it refuses to start unless
    ``allow_unauthenticated_clients = true`` says that anyone who reaches ``address`` may
    join (and claim any unused name).
    """

    address: str = "0.0.0.0:9092"  # the clients' port: Flower's Fleet API and nothing else
    insecure: bool = False
    ca_cert: str = ""
    cert: str = ""
    key: str = ""
    auth_keys: str = ""
    allow_unauthenticated_clients: bool = False
    wait_for_clients: float = 600.0  # seconds to wait for data.num_clients to connect

    def __post_init__(self) -> None:
        host, _, port = self.address.rpartition(":")
        _require(bool(host) and port.isdigit() and 0 < int(port) < 65536, "address",
                 self.address, "HOST:PORT with a port in 1..65535")
        files = [self.ca_cert, self.cert, self.key]
        _require(all(files) or not any(files), "ca_cert", self.ca_cert,
                 "all three of ca_cert, cert, key (TLS) or none of them")
        _require(not (self.insecure and any(files)), "insecure", self.insecure,
                 "false when certificate files are given")
        _require(not (self.insecure and self.auth_keys), "auth_keys", self.auth_keys,
                 "empty with insecure = true (Flower's node authentication needs TLS)")
        _require(self.wait_for_clients > 0, "wait_for_clients", self.wait_for_clients,
                 "seconds > 0")

    @property
    def tls(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True)
class Scenario:
    run: RunSpec = field(default_factory=RunSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationSpec = field(default_factory=FederationSpec)
    simulation: SimulationSpec = field(default_factory=SimulationSpec)
    clients: ClientsSpec = field(default_factory=ClientsSpec)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    server: ServerSpec = field(default_factory=ServerSpec)

    def __post_init__(self) -> None:
        n = self.data.num_clients
        if self.federation.clients_per_round > n:
            raise ConfigError(
                f"federation.clients_per_round = {self.federation.clients_per_round} is larger "
                f"than data.num_clients = {n}; allowed: 0 (all) to {n}"
            )
        if self.federation.eval_clients > n:
            raise ConfigError(
                f"federation.eval_clients = {self.federation.eval_clients} is larger than "
                f"the {n} clients (data.num_clients)")
        if self.federation.min_clients > self.sampled_per_round:
            raise ConfigError(
                f"federation.min_clients = {self.federation.min_clients} exceeds the "
                f"{self.sampled_per_round} clients sampled per round"
            )
        self._check_privacy()

    def _check_privacy(self) -> None:
        """Refuse DP configurations that look private but are not, before any work."""
        p, fed = self.privacy, self.federation
        if p.secure_aggregation:
            if fed.aggregator not in ADDITIVE_AGGREGATORS:
                raise ConfigError(
                    f"privacy.secure_aggregation cannot serve aggregator = {fed.aggregator!r}: "
                    "stacking and SVD-based aggregators need each client's own factors, so "
                    "the server sees every update; use ffa, fedavg or zeropad")
            raise ConfigError(
                "privacy.secure_aggregation is not available yet: flwr 1.41 runs SecAgg+ "
                "only inside its legacy workflow (SecAggPlusWorkflow needs a LegacyContext "
                "and a legacy Strategy), not in Message-API apps like fedtune's; see "
                "docs/privacy.md. Client-level DP with mode = 'distributed' needs no "
                "trusted server for the noise")
        if not p.client_level:
            return
        form = DP_FORMS.get(fed.aggregator)
        if form is None:
            raise ConfigError(
                f"privacy.mode = {p.mode!r} cannot be used with aggregator = "
                f"{fed.aggregator!r}: its weights depend on the updates themselves, so one "
                "client's influence is not bounded by the clip norm; use ffa (exact and "
                "linear), fedavg or zeropad")
        if fed.merge != "mean" or fed.padding != "zeros":
            raise ConfigError(
                "privacy.mode needs federation.merge = 'mean' and federation.padding = "
                f"'zeros' (got {fed.merge!r}, {fed.padding!r}): TIES and skip-padding weigh "
                "entries by which clients sent them, which breaks the fixed sensitivity")
        if p.mode == "distributed" and form == "dense":
            raise ConfigError(
                f"privacy.mode = 'distributed' cannot be used with aggregator = "
                f"{fed.aggregator!r}: its noise belongs on the dense sum of weight updates, "
                "which only the server forms; use mode = 'central', or aggregator = ffa")
        if p.min_clients > self.sampled_per_round:
            raise ConfigError(
                f"privacy.min_clients = {p.min_clients} exceeds the {self.sampled_per_round} "
                "clients sampled per round: no round could be released")
        try:
            plan = self.privacy_plan()
        except BudgetError as err:
            raise ConfigError(f"privacy.target_epsilon: {err}") from None
        if p.on_budget == "refuse" and plan.planned_epsilon > p.budget * (1 + 1e-3):
            rounds = affordable_releases(p.budget, plan.noise_multiplier, plan.sample_rate,
                                         p.delta, self.run.rounds, p.accountant)
            raise ConfigError(
                f"privacy: {self.run.rounds} rounds at noise_multiplier "
                f"{plan.noise_multiplier:g} spend epsilon {plan.planned_epsilon:.3g} > "
                f"max_epsilon {p.budget:g}; {rounds} rounds fit the budget (set "
                "run.rounds, raise the noise, or on_budget = 'stop')")

    def privacy_plan(self) -> PrivacyPlan:
        """z (given, or from target_epsilon for the planned rounds) and its epsilon."""
        p = self.privacy
        rate = self.sampled_per_round / self.data.num_clients
        z = p.noise_multiplier or noise_multiplier_for(
            p.target_epsilon, p.delta, rate, self.run.rounds, p.accountant)
        planned = epsilon_after([(z, rate, self.run.rounds)], p.delta, p.accountant)
        return PrivacyPlan(z, rate, self.run.rounds, planned)

    @property
    def sampled_per_round(self) -> int:
        return self.federation.clients_per_round or self.data.num_clients

    # ---- conversions -------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            f.name: {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
            for f in dataclasses.fields(self)
        }

    def to_flat(self) -> dict[str, Any]:
        """Flat ``section.key`` mapping of scalars (lists joined by commas) for Flower."""
        flat: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                if isinstance(value, list):
                    value = ",".join(value)
                elif isinstance(value, dict):
                    value = ",".join(f"{k}={v}" for k, v in value.items())
                flat[f"{section}.{key}"] = value
        return flat

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SECTION_TYPES = {
    "run": RunSpec, "model": ModelSpec, "lora": LoraSpec, "data": DataSpec,
    "train": TrainConfig, "federation": FederationSpec, "simulation": SimulationSpec,
    "clients": ClientsSpec, "compression": CompressionConfig, "privacy": PrivacyConfig,
    "server": ServerSpec,
}


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key} = {value!r} is not allowed; expected {allowed}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---- building ---------------------------------------------------------------------
def build_scenario(raw: Mapping[str, Any], origin: str = "scenario") -> Scenario:
    """Validate a nested mapping (parsed TOML) into a :class:`Scenario`."""
    unknown = sorted(set(raw) - set(_SECTION_TYPES))
    if unknown:
        raise ConfigError(
            f"{origin}: unknown section [{unknown[0]}]; allowed sections: "
            f"{', '.join(_SECTION_TYPES)}"
        )
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        values = raw.get(name, {})
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: [{name}] must be a table, got {values!r}")
        sections[name] = _build_section(name, cls, values, origin)
    try:
        return Scenario(**sections)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None


def _build_section(name: str, cls: type, values: Mapping[str, Any], origin: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in fields:
            raise ConfigError(
                f"{origin}: unknown key {name}.{raw_key}; allowed keys in [{name}]: "
                f"{', '.join(fields)}"
            )
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key], origin)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{origin}: [{name}] {err}") from None


def _coerce(key: str, value: Any, hint: Any, origin: str) -> Any:
    """Check a value against a field's type, converting where it is lossless."""
    expected = _describe(hint)
    origin_hint = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin_hint in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], origin)
    if origin_hint is dict:
        if isinstance(value, str):  # the flat form "a=0.5,b=0.5"
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if all(len(p) == 2 for p in pairs):
                value = {k.strip(): _number(v) for k, v in pairs}
        if isinstance(value, Mapping) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
        ):
            return {str(k): float(v) for k, v in value.items()}
    elif origin_hint is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(i, str) for i in items):
            return tuple(i.strip() for i in items if i.strip())
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{origin}: {key} = {value!r} has the wrong type; expected {expected}")


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is dict:
        return "a table of name = proportion"
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "none"}.get(hint, str(hint))


# ---- loading and overriding ----------------------------------------------------------
def resolve_scenario_path(name: str | Path | None) -> Path:
    """A path, or the name of a bundled scenario (``default``, ``tiny``, ...)."""
    if name is None:
        return DEFAULT_SCENARIO
    path = Path(name)
    if path.exists():
        return path
    bundled = SCENARIO_DIR / (path.name if path.suffix else f"{path.name}.toml")
    if path.parent == Path(".") and bundled.exists():  # a bare name, never a missing path
        return bundled
    choices = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
    raise ConfigError(f"scenario file {str(name)!r} not found; bundled scenarios: {choices}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value parsed as a TOML value or a string)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. run.rounds=2")
    dotted, raw_value = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return section, key, value


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply flat ``section.key`` overrides onto a nested mapping (a copy)."""
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        merged.setdefault(section, {})[key] = value
    return merged


def load_scenario(path: str | Path | None = None, overrides: list[str] | None = None) -> Scenario:
    """Read a scenario TOML file and apply ``section.key=value`` overrides."""
    resolved = resolve_scenario_path(path)
    try:
        raw = tomllib.loads(resolved.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{resolved}: not valid TOML: {err}") from None
    flat = {}
    for text in overrides or []:
        section, key, value = parse_override(text)
        flat[f"{section}.{key}"] = value
    return build_scenario(apply_overrides(raw, flat), origin=str(resolved))


def scenario_from_flat(flat: Mapping[str, Any]) -> Scenario:
    """Rebuild a scenario from a Flower run config.

    ``scenario`` (a file) is read first when present; every ``section.key`` entry
    then overrides it, and so does each whitespace-separated ``section.key=value`` in
    ``overrides``. ``flwr run`` only accepts run-config keys that pyproject.toml declares,
    so there it is ``--run-config 'overrides="run.rounds=2 train.steps=4"'``.
    """
    base: dict[str, Any] = {}
    if flat.get("scenario"):
        base = tomllib.loads(resolve_scenario_path(str(flat["scenario"])).read_text())
    dotted = {k: v for k, v in flat.items() if "." in k}
    for text in str(flat.get("overrides") or "").split():
        section, key, value = parse_override(text)
        dotted[f"{section}.{key}"] = value
    return build_scenario(apply_overrides(base, dotted), origin="run config")
