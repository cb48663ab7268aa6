"""Client-level differential privacy around any aggregator, the way Flower wraps a
strategy (``DifferentialPrivacyServerSideFixedClipping``): the wrapper owns what DP
adds to a round (the release, the accountant, the budget, the noise seed) and asks the
aggregator only what it is (``capabilities.dp_form``, ``capabilities.freeze_A``,
``dp_release_rank``).

Unlike Flower's wrapper it does not call the aggregator's own ``aggregate`` on the
clipped updates: an aggregator weighs clients by their example counts (which would
leak) and divides by the clients that replied, while the Gaussian mechanism needs
equal weights and the number *sampled* as the denominator. So the release is the
mechanism's (``fedtune.privacy.mechanism``) in the form the aggregator declares: its
factors ("factor") or the dense weight update truncated to its rank ("dense").

It takes plain numbers (:class:`DPSettings`), built by the caller from the scenario,
and imports nothing outside ``fedtune.core`` and ``fedtune.privacy``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors
from fedtune.core.seeds import round_seed, server_noise_seed
from fedtune.privacy.accountant import PrivacyAccountant
from fedtune.privacy.mechanism import (
    ClientLevelDP,
    PrivacyError,
    Release,
    dense_release,
    factor_release,
)
from fedtune.privacy.noise import GaussianNoise

log = logging.getLogger("fedtune")

MODES = ("central", "distributed")
#: what summary.json says the epsilon is for (docs/privacy.md, "the mechanism as run")
MECHANISM = ("DP-FedAvg: each available client joins a round independently with "
             "probability q (Poisson subsampling, q = expected cohort / clients available); "
             "the clipped updates (L2 <= clip_norm) are summed, divided by the expected "
             "cohort, and Gaussian noise of std noise_multiplier * clip_norm / expected "
             "cohort is added; every round is charged at the q it used")
NEIGHBOURING = "add/remove one client with all of its data (Poisson subsampling)"
REPRODUCIBLE = ("run seed (privacy.reproducible = true: an experiment; whoever knows "
                "run.seed knows the sample and the noise, so the epsilon does not hold)")


class _Capabilities(Protocol):
    dp_form: str | None
    freeze_A: bool


class Wrappable(Protocol):
    """What the wrapper needs of an aggregator (``fedtune.aggregation.base.Aggregator``)."""

    name: str
    capabilities: _Capabilities

    def aggregate(self, updates: list[ClientUpdate], previous: GlobalAdapter | None
                  ) -> GlobalAdapter: ...

    def dp_release_rank(self, ranks: Sequence[int]) -> int: ...

    def metrics(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class DPSettings:
    """One run's client-level DP: the mechanism (C, z), where it runs, what it costs."""

    mode: str  # "central": the server clips and noises; "distributed": each client does
    clip_norm: float
    noise_multiplier: float
    sample_rate: float  # planned q: clients_per_round / clients (the used one may be larger)
    delta: float
    accountant: str = "rdp"
    budget: float = math.inf  # the epsilon the run may spend
    min_clients: int = 2  # distributed: the fewest clients whose shares add up to z C
    secure_noise: bool = False  # OS entropy instead of the run seed (False: reproducible)
    planned_epsilon: float = math.nan  # epsilon after the planned rounds (for the report)

    @classmethod
    def planned(cls, privacy: Any, plan: Any) -> DPSettings:
        """From a privacy section (``mode``, ``clip_norm``, ``delta``, ``accountant``,
        ``budget``, ``min_clients``, ``secure_noise``) and its plan (``noise_multiplier``,
        ``sample_rate``, ``planned_epsilon``), e.g. ``fedtune.config``'s."""
        p = privacy
        return cls(p.mode, p.clip_norm, plan.noise_multiplier, plan.sample_rate, p.delta,
                   p.accountant, p.budget, p.min_clients, p.os_entropy, plan.planned_epsilon)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DP mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")

    @property
    def client_noise_std(self) -> float:
        """Distributed mode: one client's share, z C / sqrt(min_clients), so that any
        ``min_clients`` shares add up to the central mechanism's noise."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_clients)


class ClientLevelDPAggregator:
    """Releases each round's aggregate under client-level DP and accounts for it.

    Published statistics are the mechanism's own (noise, epsilon) and counts; the
    clipped norms' mean, max and clipped fraction only in a reproducible experiment
    (they are un-noised numbers about the clients' data)."""

    def __init__(self, aggregator: Wrappable, settings: DPSettings, run_seed: int) -> None:
        if aggregator.capabilities.dp_form is None:
            raise PrivacyError(f"{aggregator.name} has no client-level DP form: its weights "
                               "depend on the updates, so the clip norm bounds no client")
        self.aggregator = aggregator
        self.settings = settings
        self.run_seed = run_seed
        self.accountant = PrivacyAccountant(settings.delta, settings.accountant)
        #: why the run ended before its planned rounds (the budget), or None
        self.stopped: str | None = None
        self._metrics: dict[str, float] = {}

    @property
    def trainable(self) -> tuple[str, ...]:
        """The factors the mechanism releases (A frozen and shared: only B)."""
        return ("B",) if self.aggregator.capabilities.freeze_A else ("A", "B")

    # ---- budget ----------------------------------------------------------------------------
    def budget_left_for_next_round(self, sample_rate: float | None = None) -> bool:
        """False when one more release (at ``sample_rate``, default the planned q) would
        take epsilon past the budget."""
        s = self.settings
        if math.isinf(s.budget):  # no budget: nothing to compute
            return True
        after = self.accountant.epsilon_if(s.noise_multiplier, sample_rate or s.sample_rate)
        return after <= s.budget * (1 + 1e-3)

    def stop_before(self, server_round: int, sample_rate: float | None = None) -> str | None:
        """The reason not to run ``server_round`` at ``sample_rate`` (it would
        overspend), kept in ``stopped``; None when the budget allows it."""
        if self.budget_left_for_next_round(sample_rate):
            return None
        at = "" if sample_rate is None else f" at sampling rate {sample_rate:.4g}"
        self.stopped = (f"privacy budget: round {server_round}{at} would take epsilon past "
                        f"{self.settings.budget:g} (spent {self.accountant.epsilon():.4g})")
        return self.stopped

    # ---- the release -----------------------------------------------------------------------
    def noise(self, server_round: int) -> GaussianNoise:
        """This round's noise source: seeded from the run (reproducible), or OS entropy."""
        if self.settings.secure_noise:
            return GaussianNoise(None)
        return GaussianNoise(server_noise_seed(round_seed(self.run_seed, server_round)))

    def aggregate(self, updates: list[ClientUpdate], previous: GlobalAdapter | None,
                  server_round: int, sampled: float, ranks: Sequence[int],
                  sample_rate: float | None = None,
                  first_base: dict[str, LoraFactors] | None = None) -> GlobalAdapter:
        """The round's release and the accountant's step for it.

        ``sampled`` is the fixed denominator m (the expected cohort q * N, not the
        clients that replied); ``sample_rate`` the q this round's sample was drawn with
        (default: the planned one), which the accountant is charged; ``ranks`` every
        client's rank, for a dense release's truncation; ``first_base`` what the first
        release goes on when there is no previous adapter: the seeded start of a client
        of the population's largest rank, so that the release has the population's shape
        from round 1 whoever was sampled (a dense release uses it only when no update
        came). Central mode clips and noises here. In distributed mode the clients did
        both and the server sums, topping the noise up to z C when fewer than
        ``min_clients`` shares arrived (a small cohort must not mean less noise)."""
        s = self.settings
        central = s.mode == "central"
        dp = ClientLevelDP(s.clip_norm, self._server_noise_multiplier(len(updates)), sampled,
                           clip=central)
        factors = first_base if previous is None else previous.factors
        noise = self.noise(server_round)
        if self.aggregator.capabilities.dp_form == "factor":
            release = factor_release(updates, factors, dp, noise, self.trainable)
        else:
            rank = self.aggregator.dp_release_rank(ranks)
            on = previous.factors if previous is not None else (None if updates else factors)
            release = dense_release(updates, on, dp, noise, rank)
        self.accountant.step(s.noise_multiplier, sample_rate or s.sample_rate)
        self._metrics = self._release_metrics(release, len(updates), sampled, server_round)
        round_number = 1 if previous is None else previous.round + 1
        return GlobalAdapter(release.factors, round=round_number)

    def _server_noise_multiplier(self, shares: int) -> float:
        """Central: z. Distributed: what the server adds so that the ``shares`` clients'
        noise and its own make at least z C (0 once ``min_clients`` shares arrived)."""
        s = self.settings
        if s.mode == "central":
            return s.noise_multiplier
        missing = max(0, s.min_clients - shares)
        return s.noise_multiplier * math.sqrt(missing / s.min_clients)

    def _release_metrics(self, release: Release, replies: int, sampled: float,
                         server_round: int) -> dict[str, float]:
        s = self.settings
        metrics = {"dp_noise_std": release.noise_std}
        if s.mode == "distributed":  # the clients' shares and the server's top-up
            shares = max(replies, s.min_clients)
            metrics["dp_noise_std"] = s.client_noise_std * math.sqrt(shares) / sampled
        if not s.secure_noise and s.mode == "central":  # an experiment: clipped values only
            clipped = [min(n, s.clip_norm) for n in release.norms] or [0.0]
            metrics.update(dp_update_norm_mean=sum(clipped) / len(clipped),
                           dp_update_norm_max=max(clipped),
                           dp_clipped_fraction=release.clipped / max(1, len(release.norms)))
        ratio = metrics["dp_noise_std"] * math.sqrt(release.released) / s.clip_norm
        if ratio > 1 and server_round == 1:
            log.warning(
                "privacy: the noise on the average is %.1f times the largest norm the average "
                "update can have (z sqrt(d) / m with d = %d released entries, m = %.4g); it "
                "will drown the updates. Sample more clients per round, release fewer "
                "entries (ffa, lower rank, fewer modules) or accept a larger epsilon",
                ratio, release.released, sampled)
        return {**metrics, "dp_noise_to_signal": ratio, "epsilon": self.accountant.epsilon(),
                "delta": s.delta, "noise_multiplier": s.noise_multiplier}

    def metrics(self) -> dict[str, float]:
        """The aggregator's numbers and the last release's (noise, norms, epsilon)."""
        return {**self.aggregator.metrics(), **self._metrics}

    # ---- report and checkpoint ---------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The plan and what was spent, for the run's summary."""
        s = self.settings
        used = [q for _, q, _ in self.accountant.history]
        return {"mechanism": MECHANISM, "neighbouring": NEIGHBOURING,
                "randomness": "OS entropy" if s.secure_noise else REPRODUCIBLE,
                "clip_norm": s.clip_norm, "noise_multiplier": s.noise_multiplier,
                "sample_rate": s.sample_rate, "sample_rate_max_used": max(used, default=None),
                "planned_epsilon": s.planned_epsilon,
                "epsilon": self.accountant.epsilon(), "rounds_released": self.accountant.releases,
                "budget": s.budget, "stopped": self.stopped}

    def state(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state(), "stopped": self.stopped}

    def load_state(self, state: dict[str, Any]) -> None:
        saved = state["accountant"]
        if saved is not None:
            self.accountant = PrivacyAccountant(float(saved["delta"]), str(saved["kind"]),
                                                [tuple(h) for h in saved["history"]])
        self.stopped = state["stopped"]
