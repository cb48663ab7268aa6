"""Privacy accounting through Opacus' accountants (RDP or PRV), never our own formulas.

Each release of a noised aggregate (a federated round, or a DP-SGD step on a client) is
one subsampled Gaussian mechanism with noise multiplier z and sampling rate q; the
accountant composes them and converts to epsilon at the configured delta. The subsampling
analysis assumes Poisson sampling (each client, or example, joins independently with
probability q), the standard approximation for a fixed-size uniform sample.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

ACCOUNTANTS = ("rdp", "prv")
#: Beyond this noise multiplier a target epsilon counts as unreachable (the update would
#: drown: the noise standard deviation is z * C / m).
MAX_NOISE_MULTIPLIER = 1000.0

Step = tuple[float, float, int]  # (noise multiplier, sample rate, number of steps)


class BudgetError(ValueError):
    """A privacy target or budget cannot be met with the planned schedule."""


def _check_kind(kind: str) -> None:
    if kind not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {kind!r}")


def _accountant(kind: str, history: Sequence[Step] = ()) -> Any:
    """An Opacus accountant replaying ``history`` (imported here: Opacus takes seconds to
    import, and a run without DP should not pay for it)."""
    from opacus.accountants import create_accountant

    _check_kind(kind)
    accountant = create_accountant(kind)
    accountant.history = [tuple(step) for step in history]
    return accountant


def epsilon_after(steps: Sequence[Step], delta: float, kind: str = "rdp") -> float:
    """Epsilon at ``delta`` after composing ``steps``; inf when any step has no noise."""
    if any(z <= 0 for z, _, _ in steps):
        return math.inf
    if not steps:
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the largest alpha": still a bound
        warnings.simplefilter("ignore")
        return float(_accountant(kind, steps).get_epsilon(delta=delta))


class PrivacyAccountant:
    """Composes releases as they happen; its history is its whole state (for resume)."""

    def __init__(self, delta: float, kind: str = "rdp", history: Sequence[Step] = ()) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        _check_kind(kind)
        self.delta = delta
        self.kind = kind
        self.history: list[Step] = [tuple(step) for step in history]

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` releases with the same (z, q)."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            z, q, n = self.history[-1]
            self.history[-1] = (z, q, n + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

    @property
    def releases(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        return epsilon_after(self.history, self.delta, self.kind)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Epsilon if ``steps`` more such releases happened (nothing is recorded)."""
        return epsilon_after([*self.history, (noise_multiplier, sample_rate, steps)],
                             self.delta, self.kind)

    def state(self) -> dict[str, object]:
        return {"delta": self.delta, "kind": self.kind, "history": [list(s) for s in self.history]}


@functools.lru_cache(maxsize=64)
def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         kind: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus' tolerance) whose ``steps`` releases at
    ``sample_rate`` stay within ``target_epsilon`` at ``delta``; BudgetError when even
    ``MAX_NOISE_MULTIPLIER`` is not enough. Cached: the search costs seconds and a run asks
    it for the same plan several times (loading the scenario, the strategy, the clients)."""
    if target_epsilon <= 0 or not math.isfinite(target_epsilon):
        raise BudgetError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    floor = epsilon_after([(MAX_NOISE_MULTIPLIER, sample_rate, steps)], delta, kind)
    if floor > target_epsilon:
        raise BudgetError(
            f"target epsilon {target_epsilon} is unreachable in {steps} releases at sampling "
            f"rate {sample_rate:.4g} and delta {delta:g}: even noise multiplier "
            f"{MAX_NOISE_MULTIPLIER:g} spends {floor:.4g}; plan fewer rounds, sample fewer "
            "clients per round, or raise the target"
        )
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=kind,
                                          epsilon_tolerance=0.005 * target_epsilon))


def affordable_releases(budget: float, noise_multiplier: float, sample_rate: float,
                        delta: float, limit: int, kind: str = "rdp") -> int:
    """How many releases (up to ``limit``) keep epsilon within ``budget``."""
    low, high = 0, limit
    while low < high:  # epsilon grows with the number of releases: bisect
        mid = (low + high + 1) // 2
        if epsilon_after([(noise_multiplier, sample_rate, mid)], delta, kind) <= budget:
            low = mid
        else:
            high = mid - 1
    return low
