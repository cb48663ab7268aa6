"""An independent check of the epsilon fedtune reports (Opacus' RDP accountant) with
Google's ``dp-accounting``, for the mechanism as run: Poisson-subsampled Gaussian
releases, one per round, at the sampling rate each round used. The shipped
``simulations/privacy.toml`` as planned, and the same run when half the clients are
gone after round 1 (q = 1 from then on): the epsilon follows the q used."""

from pathlib import Path

import dp_accounting
import pytest
import tomllib
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedtune.privacy.accountant import PrivacyAccountant, noise_multiplier_for

SCENARIO = Path(__file__).parents[2] / "simulations" / "privacy.toml"


def _events(steps):
    """(z, q, rounds) steps as dp-accounting's events: each round one Poisson-sampled
    Gaussian mechanism (sensitivity 1, std z: the clip norm cancels)."""
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)
        for z, q, n in steps])


def _independent(steps, delta):
    """(RDP epsilon, PLD epsilon) from dp-accounting."""
    rdp = RdpAccountant()
    rdp.compose(_events(steps))
    pld = PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(_events(steps))
    return rdp.get_epsilon(delta), pld.get_epsilon(delta)


@pytest.fixture(scope="module")
def planned():
    """privacy.toml's own numbers: q = clients_per_round / num_clients, the planned
    rounds, delta, and the z fedtune's plan picks for its target epsilon."""
    toml = tomllib.loads(SCENARIO.read_text())
    privacy = toml["privacy"]
    q = toml["federation"]["clients_per_round"] / toml["data"]["num_clients"]
    rounds, delta = toml["run"]["rounds"], privacy["delta"]
    z = noise_multiplier_for(privacy["target_epsilon"], delta, q, rounds, "rdp")
    return z, q, rounds, delta, privacy["target_epsilon"]


def _reported(steps, delta):
    accountant = PrivacyAccountant(delta, "rdp")
    for z, q, n in steps:
        accountant.step(z, q, n)
    return accountant.epsilon()


def test_privacy_toml_epsilon_agrees_with_dp_accounting(planned):
    z, q, rounds, delta, target = planned
    steps = [(z, q, rounds)]
    reported = _reported(steps, delta)
    rdp, pld = _independent(steps, delta)
    assert reported <= target
    assert reported == pytest.approx(rdp, rel=1e-3)  # the same analysis, another code
    assert pld <= reported < pld * 1.25  # PLD is tighter; RDP an upper bound near it


def test_missing_clients_raise_q_and_epsilon_follows_the_q_used(planned):
    """Half the clients leave after round 1: the expected cohort is kept, so q = 1."""
    z, q, rounds, delta, _ = planned
    used = [(z, q, 1), (z, min(1.0, 2 * q), rounds - 1)]
    reported = _reported(used, delta)
    rdp, pld = _independent(used, delta)
    assert reported == pytest.approx(rdp, rel=1e-3)
    assert pld <= reported
    as_planned, _ = _independent([(z, q, rounds)], delta)
    assert reported > as_planned * 1.1  # charging the planned q would under-report
