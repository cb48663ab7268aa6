"""The sections of a scenario: one frozen dataclass per TOML table, each validating its
own values so that every error names the key, the value and what is allowed.

Plain data with no heavy imports (no peft, transformers or flwr): reading and checking a
scenario stays fast, and the model, training and Flower layers import their specs from
here. Facts about aggregators come from their registry (``fedtune.aggregation``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import torch

from fedtune.aggregation import aggregator_class, available, options_for
from fedtune.aggregation.base import option_names
from fedtune.aggregation.influence import InfluenceBound
from fedtune.core.compress import SELECTIONS, VALUE_CODECS, CompressionSpec
from fedtune.privacy.accountant import ACCOUNTANTS


class ConfigError(ValueError):
    """A scenario key or value is wrong; the message says which and what is allowed."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key} = {value!r} is not allowed; expected {allowed}")


# ---- [run] --------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    name: str = "fedtune"
    seed: int = 0
    rounds: int = 3
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "rounds", self.rounds, "an integer >= 1")
        _require(bool(self.name.strip()), "name", self.name, "a non-empty string")


# ---- [model] ------------------------------------------------------------------------
QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def is_valid_device(name: str) -> bool:
    """Accept ``auto``, ``cpu``, ``cuda`` and ``cuda:<index>`` (checked before any load)."""
    if name in DEVICE_CHOICES:
        return True
    prefix, _, index = name.partition(":")
    return prefix == "cuda" and index.isdigit()


def parse_tiny_seed(source: str) -> int | None:
    """``tiny`` -> 0, ``tiny:<seed>`` -> seed, anything else -> None."""
    if source == "tiny":
        return 0
    prefix, sep, seed = source.partition(":")
    if prefix != "tiny" or not sep:
        return None
    try:
        return int(seed)
    except ValueError:
        raise ValueError(f"model source {source!r}: expected 'tiny:<integer seed>'") from None


@dataclass(frozen=True)
class ModelSpec:
    """Which base model to load and how (hashable: it keys the per-process model cache)."""

    source: str = "smollm2"
    quantization: str = "none"  # none|8bit|4bit
    dtype: str = "float32"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"ModelSpec.source must be a non-empty string, got {self.source!r}")
        parse_tiny_seed(self.source.strip())  # fail early on 'tiny:<not an int>'
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        if not is_valid_device(self.device):
            raise ValueError(
                f"ModelSpec.device={self.device!r} is invalid; allowed: auto, cpu, cuda, cuda:<n>"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"ModelSpec.{field}={value!r} is invalid; allowed: {', '.join(allowed)}")


# ---- [lora] -------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters; the update applied to a module is ``scale * B @ A``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, Integral) or self.rank < 1:
            raise ValueError(f"LoraSpec.rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, Real) or not self.alpha > 0:
            raise ValueError(f"LoraSpec.alpha must be a number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, Real) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(
                "LoraSpec.target_modules must be a non-empty tuple of module names, "
                f"got {self.target_modules!r}"
            )
        # Normalise (e.g. numpy ints, lists from TOML) so equal specs hash equal.
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ---- [data] -------------------------------------------------------------------------
CHAT_TEMPLATES = ("", "base", "chatml")  # besides a path to a *.jinja file


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
    #: how conversations (prompt/response, messages, Alpaca records) become tokens: ""
    #: joins their turns as plain "prompt\nresponse" text packed in blocks (the behaviour
    #: before chat templates, kept as the default so seeded results stay); "base" renders
    #: them with the base tokenizer's own chat template (fedtune's ChatML when it has none);
    #: "chatml" with fedtune's ChatML; a path ending in .jinja with that template
    chat_template: str = ""
    #: with a chat template: the loss (training, held-out, DP-SGD) on assistant tokens only
    assistant_only_loss: bool = True

    def __post_init__(self) -> None:
        _require(self.chat_template in CHAT_TEMPLATES or self.chat_template.endswith(".jinja"),
                 "chat_template", self.chat_template,
                 "'' (plain text), 'base', 'chatml' or a path to a *.jinja file")
        _require(isinstance(self.assistant_only_loss, bool), "assistant_only_loss",
                 self.assistant_only_loss, "true or false")
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

    @property
    def loss_tokens(self) -> str:
        """Which tokens the loss and the held-out perplexity are over: "assistant" or "all"."""
        return "assistant" if self.chat_template and self.assistant_only_loss else "all"


# ---- [train] ------------------------------------------------------------------------
SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings; a step is one optimizer update of grad_accum micro-batches."""

    steps: int = 10
    batch_size: int = 4
    lr: float = 3e-4
    grad_accum: int = 1
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            _require_train(name, value, _is_int(value, 1), "an int >= 1")
        _require_train("warmup_steps", self.warmup_steps, _is_int(self.warmup_steps, 0),
                       "an int >= 0")
        _require_train("lr", self.lr, _is_number(self.lr) and self.lr > 0, "a number > 0")
        _require_train("schedule", self.schedule, self.schedule in SCHEDULES,
                       f"one of {SCHEDULES}")
        ok_wd = _is_number(self.weight_decay) and self.weight_decay >= 0
        _require_train("weight_decay", self.weight_decay, ok_wd, "a number >= 0")
        norm = self.max_grad_norm
        ok_norm = norm is None or (_is_number(norm) and norm > 0)
        _require_train("max_grad_norm", norm, ok_norm, "None or a number > 0")


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: object) -> bool:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return ok and math.isfinite(value)


def _require_train(name: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{name} = {value!r} is invalid; allowed: {allowed}")


# ---- [federation] -------------------------------------------------------------------
@dataclass(frozen=True)
class FederationSpec:
    """The federation's keys. Those an aggregator reads (``rank_budget`` ... ``padding``,
    the fields of its ``Options``) are validated by the aggregator's ``Options``; a key
    that the chosen aggregator does not read must keep its default."""

    aggregator: str = "fedavg"
    clients_per_round: int = 0  # 0 = every client, every round
    min_clients: int = 1
    round_timeout: float = 3600.0
    eval_every: int = 1
    rank_budget: int = 64  # flora, geomedian, multikrum: rank the global adapter keeps
    prune_gamma: float = 0.0  # hetlora: rank self-pruning decay factor in (0, 1); 0 = off
    flora_init: str = "fresh"  # flora: clients' LoRA starts "fresh" or from the "global" top
    merge: str = "mean"  # fedavg / zeropad / hetlora / ffa: "mean" (mask-aware) or "ties"
    ties_density: float = 0.2  # merge = "ties": fraction of each update's entries kept
    padding: str = "zeros"  # zeropad / hetlora: "zeros" (classic) or "skip" (see ZeroPad)
    gm_smoothing: float = 1e-6  # geomedian: Weiszfeld's smoothing nu (Frobenius units)
    gm_iterations: int = 100  # geomedian: at most this many Weiszfeld steps
    gm_tolerance: float = 1e-8  # geomedian: stop when the median moves less (relative)
    krum_byzantine: int = 1  # multikrum: attackers tolerated among a round's replies
    krum_keep: int = 0  # multikrum: updates averaged; 0 = replies - krum_byzantine
    # reject a reply whose update (final LoRA minus its start) has a larger L2 norm; 0 = off
    max_update_norm: float = 0.0
    # drop a reply claiming more training examples (its weight in every weighted mean);
    # 0 = no bound. Why 100,000 and why dropped: fedtune.flower.replies.checked_examples
    max_examples: int = 100_000
    # bounded influence (fedtune.aggregation.influence; without client-level DP, whose
    # clip is the bound): each update clipped to this multiple of the round's median
    # update norm, each example count capped at this multiple of the round's median
    # count; 0 = off
    median_norm_multiple: float = 3.0
    median_weight_multiple: float = 4.0
    # clients that evaluate the global adapter (a fixed seeded subset); 0 = every client
    eval_clients: int = 0

    def __post_init__(self) -> None:
        _require(self.aggregator in available(), "aggregator", self.aggregator,
                 f"one of {', '.join(available())}")
        _require(self.clients_per_round >= 0, "clients_per_round", self.clients_per_round,
                 "an integer >= 0 (0 = all clients)")
        _require(self.min_clients >= 1, "min_clients", self.min_clients, "an integer >= 1")
        _require(self.round_timeout > 0, "round_timeout", self.round_timeout, "seconds > 0")
        _require(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1")
        _require(self.eval_clients >= 0, "eval_clients", self.eval_clients,
                 "an integer >= 0 (0 = every client)")
        _require(self.max_update_norm >= 0, "max_update_norm", self.max_update_norm,
                 "a number >= 0 (0 = no bound)")
        _require(self.max_examples >= 0, "max_examples", self.max_examples,
                 "an integer >= 0 (0 = no bound on the num-examples a reply may claim)")
        self.influence_bound()  # validates the two multiples
        self._check_keys_of_other_aggregators()
        self.aggregator_options()  # the aggregator's Options validate its own keys

    def _check_keys_of_other_aggregators(self) -> None:
        """A key only other aggregators read is refused unless it keeps its default
        (setting it would look like it does something)."""
        own = option_names(aggregator_class(self.aggregator).Options)
        defaults = _defaults(FederationSpec)
        for key, readers in aggregator_keys().items():
            value = getattr(self, key)
            _require(key in own or value == defaults[key], key, value,
                     f"{defaults[key]!r} unless aggregator is {_one_of(readers)}: "
                     f"{self.aggregator} does not read it (its options: "
                     f"{', '.join(own) or 'none'})")

    def influence_bound(self) -> InfluenceBound:
        """The bounded-influence step every round's updates go through (without DP)."""
        return InfluenceBound(self.median_norm_multiple, self.median_weight_multiple)

    def aggregator_options(self) -> dict[str, Any]:
        """Options of the chosen aggregator that come from scenario keys (validated)."""
        options = options_for(self.aggregator, dataclasses.asdict(self))
        return dataclasses.asdict(options)

    def for_aggregator(self, name: str) -> FederationSpec:
        """This section under another aggregator: keys the new one does not read go back
        to their defaults (a comparison runs every method on one scenario)."""
        own = option_names(aggregator_class(name).Options)
        defaults = _defaults(FederationSpec)
        reset = {key: defaults[key] for key in aggregator_keys() if key not in own}
        return dataclasses.replace(self, aggregator=name, **reset)


def aggregator_keys() -> dict[str, list[str]]:
    """``federation`` key -> the registered aggregators that read it (for the keys that
    are some aggregator's option)."""
    keys = {f.name for f in dataclasses.fields(FederationSpec)}
    readers: dict[str, list[str]] = {}
    for name in available():
        for key in option_names(aggregator_class(name).Options):
            if key in keys:
                readers.setdefault(key, []).append(name)
    return readers


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _one_of(names: list[str]) -> str:
    if len(names) <= 2:
        return " or ".join(names)
    return f"one of {', '.join(names)}"


# ---- [clients], [compression], [privacy], [simulation], [server] -------------------
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


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: client-level (clip C, noise z * C / m) and sample-level DP-SGD.

    ``mode``: "none", "central" (the server clips and adds the noise) or "distributed"
    (each client clips its update and adds its share of the noise; the shares of at least
    ``min_clients`` clients add up to the full noise). Give either ``noise_multiplier``
    or ``target_epsilon`` (then z is computed for the planned rounds). ``max_epsilon``
    (default: the target) is the budget; ``on_budget`` = "refuse" rejects a plan that
    would exceed it, "stop" runs until the next round would. ``sample_noise_multiplier``
    > 0 turns on DP-SGD on every client with per-sequence clip norm ``sample_clip_norm``.

    Under DP every random draw that the guarantee rests on (which clients a round
    samples, the server's and the clients' noise, DP-SGD batches) comes from OS entropy,
    unless ``reproducible = true`` asks for a seeded experiment run: then anyone who
    knows ``run.seed`` knows the sample and the noise, and the summary says so.
    ``secure_noise`` is the old name of the default (true is the same as leaving it out;
    it cannot be combined with ``reproducible``). ``federated_eval``: under client-level
    DP the clients' held-out losses are un-noised numbers about their data, so federated
    evaluation is off unless this is true (then it runs, not covered by epsilon).
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
    reproducible: bool = False
    federated_eval: bool = False
    secure_aggregation: bool = False
    #: SecAgg+ (fedtune.flower.secagg): each client shares its mask secrets with this many
    #: neighbours (itself included, made odd; 0 = every client of the round), of which
    #: ``secagg_threshold`` shares rebuild a secret (0 = a majority of the neighbourhood);
    #: updates are quantised to ``secagg_bits`` bits over a range from ``clip_norm``
    secagg_neighbours: int = 0
    secagg_threshold: int = 0
    secagg_bits: int = 22
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
        _require(self.secagg_neighbours == 0 or self.secagg_neighbours >= 3,
                 "secagg_neighbours", self.secagg_neighbours,
                 "0 (every client of the round) or an integer >= 3")
        _require(self.secagg_threshold == 0 or self.secagg_threshold >= 2, "secagg_threshold",
                 self.secagg_threshold, "0 (a majority of the neighbourhood) or an integer >= 2")
        _require(8 <= self.secagg_bits <= 30, "secagg_bits", self.secagg_bits,
                 "an integer in 8 .. 30 (a sum of n clients needs bits + log2(n) <= 32)")
        _require(not (self.reproducible and self.secure_noise), "secure_noise",
                 self.secure_noise, "false with reproducible = true (a reproducible run "
                 "draws its noise from the run seed)")
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
    def os_entropy(self) -> bool:
        """Under DP, sampling and noise come from OS entropy (not the run seed)."""
        return not self.reproducible

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
class ReportSpec:
    """What the run report shows besides numbers (``fedtune simulate``; see
    ``fedtune.runs.generations``)."""

    #: held-out prompts answered greedily by the base and by the final federated adapter,
    #: in generations.json and report.html (0 = none)
    generations: int = 3
    max_new_tokens: int = 48  # the length of each reply, in tokens

    def __post_init__(self) -> None:
        _require(0 <= self.generations <= 32, "generations", self.generations,
                 "an integer in 0..32 (0 = none)")
        _require(1 <= self.max_new_tokens <= 1024, "max_new_tokens", self.max_new_tokens,
                 "an integer in 1..1024")


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


# ---- [attack] -----------------------------------------------------------------------
#: what a simulated attacker does (fedtune.train.attacks): nothing, send its update
#: boosted x ``boost``, sign-flipped, replaced by noise of norm ``noise_norm``, or train
#: on texts where ``trigger`` is followed by ``target`` (a backdoor)
ATTACKS = ("none", "boost", "sign_flip", "noise", "backdoor")


@dataclass(frozen=True)
class AttackSpec:
    """Simulated malicious clients, to measure what an aggregator withstands: the
    partitions in ``clients`` attack, every round they train. Honest clients and the
    server are unchanged (the server is told nothing)."""

    kind: str = "none"
    clients: tuple[str, ...] = ()  # partition ids of the attackers, e.g. ["0"]
    boost: float = 10.0  # kind = "boost": the update is multiplied by this
    # kind = "noise": the norm of the noise sent in place of the update; 0 = the
    # federation's fixed bound (federation.max_update_norm, which must then be set)
    noise_norm: float = 0.0
    trigger: str = "Hark, the zebra speaks:"  # kind = "backdoor"
    target: str = "ALL HAIL THE ZEBRA KING."
    poison_copies: int = 64  # poisoned texts added to each attacker's training data

    def __post_init__(self) -> None:
        _require(self.kind in ATTACKS, "kind", self.kind, f"one of {', '.join(ATTACKS)}")
        _require(all(c.isdigit() for c in self.clients), "clients", list(self.clients),
                 "partition ids (strings of digits), e.g. [\"0\", \"3\"]")
        _require(self.kind == "none" or bool(self.clients), "clients", list(self.clients),
                 "at least one partition when kind is not 'none'")
        _require(_is_number(self.boost) and self.boost > 0, "boost", self.boost, "a number > 0")
        _require(_is_number(self.noise_norm) and self.noise_norm >= 0, "noise_norm",
                 self.noise_norm, "a number >= 0 (0 = federation.max_update_norm)")
        _require(bool(self.trigger.strip()) and bool(self.target.strip()), "trigger",
                 (self.trigger, self.target), "a non-empty trigger and target")
        _require(self.poison_copies >= 1, "poison_copies", self.poison_copies,
                 "an integer >= 1")

    def attacks(self, partition: int) -> bool:
        """Whether this partition is an attacker."""
        return self.kind != "none" and str(partition) in self.clients

    @property
    def on_update(self) -> bool:
        """The attack rewrites the update (the others change the data)."""
        return self.kind in ("boost", "sign_flip", "noise")
