"""Epsilon comes from Opacus' accountants: the same numbers as calling them directly."""

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedtune.privacy.accountant import (
    BudgetError,
    PrivacyAccountant,
    affordable_releases,
    epsilon_after,
    noise_multiplier_for,
)


@pytest.mark.parametrize("kind,library", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
@pytest.mark.parametrize("z,q,rounds", [(1.1, 0.5, 5), (0.8, 0.1, 40), (3.0, 1.0, 3)])
def test_epsilon_equals_the_library_accountant(kind, library, z, q, rounds):
    ours = PrivacyAccountant(delta=1e-5, kind=kind)
    theirs = library()
    for _ in range(rounds):
        ours.step(z, q)
        theirs.step(noise_multiplier=z, sample_rate=q)
    assert ours.releases == rounds
    assert ours.epsilon() == pytest.approx(theirs.get_epsilon(delta=1e-5), rel=1e-9)


def test_epsilon_grows_with_rounds_and_is_inf_without_noise():
    eps = [epsilon_after([(1.0, 0.5, n)], 1e-5) for n in (1, 2, 4, 8)]
    assert eps == sorted(eps) and eps[0] > 0
    assert epsilon_after([(0.0, 0.5, 1)], 1e-5) == math.inf
    assert epsilon_after([], 1e-5) == 0.0


def test_accountant_history_is_its_state():
    a = PrivacyAccountant(1e-5)
    a.step(1.0, 0.5)
    a.step(1.0, 0.5, 2)
    a.step(2.0, 0.25)
    assert a.history == [(1.0, 0.5, 3), (2.0, 0.25, 1)]
    b = PrivacyAccountant(1e-5, history=a.state()["history"])
    assert b.epsilon() == a.epsilon()
    assert a.epsilon_if(2.0, 0.25) == pytest.approx(
        epsilon_after([(1.0, 0.5, 3), (2.0, 0.25, 2)], 1e-5))
    assert a.releases == 4  # epsilon_if records nothing


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_noise_multiplier_for_target_meets_it(target):
    z = noise_multiplier_for(target, 1e-4, 0.5, 3)
    reached = epsilon_after([(z, 0.5, 3)], 1e-4)
    assert reached <= target
    assert reached > 0.95 * target  # not wastefully much noise


def test_unreachable_target_and_bad_values():
    with pytest.raises(BudgetError, match="unreachable"):
        noise_multiplier_for(1e-5, 1e-5, 1.0, 1000)
    with pytest.raises(BudgetError, match="> 0"):
        noise_multiplier_for(0.0, 1e-5, 0.5, 3)
    with pytest.raises(ValueError, match="delta"):
        PrivacyAccountant(delta=1.0)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyAccountant(delta=1e-5, kind="moments")
    with pytest.raises(ValueError, match="sample rate"):
        PrivacyAccountant(delta=1e-5).step(1.0, 0.0)


def test_affordable_releases_is_the_last_within_budget():
    n = affordable_releases(4.0, 1.0, 0.5, 1e-5, limit=1000)
    assert epsilon_after([(1.0, 0.5, n)], 1e-5) <= 4.0 < epsilon_after([(1.0, 0.5, n + 1)], 1e-5)
