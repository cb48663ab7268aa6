"""The DP wrapper around an aggregator, with stand-in aggregators (it asks only for
``capabilities``, ``dp_release_rank`` and ``metrics``): the release is the mechanism's
in the aggregator's form, seeded from the round, accounted, and the budget stops a run."""

import math
from dataclasses import dataclass

import pytest
import torch

from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors
from fedtune.core.seeds import round_seed, server_noise_seed
from fedtune.privacy.accountant import epsilon_after
from fedtune.privacy.mechanism import ClientLevelDP, PrivacyError, dense_release, factor_release
from fedtune.privacy.noise import GaussianNoise
from fedtune.privacy.wrapper import ClientLevelDPAggregator, DPSettings

OUT, IN, RUN_SEED = 6, 5, 11


@dataclass(frozen=True)
class _Capabilities:
    dp_form: str | None = "factor"
    freeze_A: bool = False


class _Aggregator:
    name = "stand-in"

    def __init__(self, dp_form="factor", freeze_A=False, release_rank=3):
        self.capabilities = _Capabilities(dp_form, freeze_A)
        self.release_rank = release_rank
        self.asked: list[list[int]] = []

    def aggregate(self, updates, previous):  # pragma: no cover - DP never calls it
        raise AssertionError("the DP release replaces the aggregator's weighted mean")

    def dp_release_rank(self, ranks):
        self.asked.append(list(ranks))
        return self.release_rank

    def metrics(self):
        return {"own_metric": 1.0}


def _settings(**changes):
    values = dict(mode="central", clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.5,
                  delta=1e-5)
    return DPSettings(**{**values, **changes})


def _updates(clients=2):
    gen = torch.Generator().manual_seed(0)
    start = LoraFactors(A=torch.randn(2, IN, generator=gen), B=torch.zeros(OUT, 2), scale=2.0)
    out = []
    for k in range(clients):
        final = LoraFactors(A=start.A + torch.randn(2, IN, generator=gen),
                            B=torch.randn(OUT, 2, generator=gen), scale=2.0)
        out.append(ClientUpdate({"m": final}, 10, str(k), metrics={"dp-update-norm": 2.0 + k},
                                start={"m": start}))
    return out


def _base():
    """The public start every stand-in client had (the first release goes on it)."""
    return {"m": _updates(clients=1)[0].start["m"]}


def _noise(server_round):
    return GaussianNoise(server_noise_seed(round_seed(RUN_SEED, server_round)))


def test_a_factor_release_is_the_mechanisms_with_the_rounds_noise_seed():
    dp = ClientLevelDPAggregator(_Aggregator(), _settings(), RUN_SEED)
    updates = _updates()
    adapter = dp.aggregate(updates, None, server_round=3, sampled=4, ranks=[2, 2],
                           first_base=_base())
    expected = factor_release(updates, _base(), ClientLevelDP(1.0, 1.0, 4), _noise(3))
    assert adapter.round == 1
    assert torch.equal(adapter.factors["m"].A, expected.factors["m"].A)
    assert torch.equal(adapter.factors["m"].B, expected.factors["m"].B)
    assert dp.accountant.history == [(1.0, 0.5, 1)]
    metrics = dp.metrics()
    assert metrics["own_metric"] == 1.0 and metrics["noise_multiplier"] == 1.0
    assert metrics["epsilon"] == pytest.approx(epsilon_after([(1.0, 0.5, 1)], 1e-5))
    assert metrics["dp_noise_std"] == pytest.approx(1.0 * 1.0 / 4)


def test_frozen_A_releases_only_B():
    dp = ClientLevelDPAggregator(_Aggregator(freeze_A=True), _settings(), RUN_SEED)
    updates = _updates()
    adapter = dp.aggregate(updates, None, server_round=1, sampled=2, ranks=[2, 2],
                           first_base=_base())
    assert dp.trainable == ("B",)
    assert torch.equal(adapter.factors["m"].A, updates[0].start["m"].A)


def test_a_dense_release_is_truncated_to_the_rank_the_aggregator_names():
    aggregator = _Aggregator(dp_form="dense", release_rank=3)
    dp = ClientLevelDPAggregator(aggregator, _settings(), RUN_SEED)
    updates = _updates()
    previous = GlobalAdapter(dense_release(updates, None, ClientLevelDP(1.0, 0.0, 2),
                                           GaussianNoise(0), 1).factors, round=4)
    adapter = dp.aggregate(updates, previous, server_round=5, sampled=2, ranks=[2, 4, 2])
    assert aggregator.asked == [[2, 4, 2]]
    assert adapter.round == 5 and adapter.factors["m"].rank == 3
    expected = dense_release(updates, previous.factors, ClientLevelDP(1.0, 1.0, 2), _noise(5), 3)
    torch.testing.assert_close(adapter.factors["m"].delta(), expected.factors["m"].delta())


def test_distributed_mode_neither_clips_nor_noises_nor_publishes_the_clients_norms():
    """Enough shares arrived: the server only sums; the clients' own norms (un-noised
    numbers about their data) are never published."""
    dp = ClientLevelDPAggregator(_Aggregator(), _settings(mode="distributed", min_clients=2),
                                 RUN_SEED)
    updates = _updates()
    adapter = dp.aggregate(updates, None, server_round=1, sampled=2, ranks=[2, 2],
                           first_base=_base())
    plain = factor_release(updates, _base(), ClientLevelDP(1.0, 1.0, 2, clip=False,
                                                        add_noise=False), GaussianNoise(0))
    assert torch.equal(adapter.factors["m"].B, plain.factors["m"].B)
    metrics = dp.metrics()
    assert not {"dp_update_norm_max", "dp_update_norm_mean", "dp_clipped_fraction"} & set(metrics)
    share = 1.0 * 1.0 / math.sqrt(2)
    assert dp.settings.client_noise_std == pytest.approx(share)
    assert metrics["dp_noise_std"] == pytest.approx(share * math.sqrt(2) / 2)


def test_distributed_mode_tops_the_noise_up_when_fewer_shares_than_min_clients_arrive():
    """One share of four: the server adds the three missing ones (std z C sqrt(3/4) / m),
    so a small Poisson cohort never means less noise."""
    z, m = 2.0, 3.0
    dp = ClientLevelDPAggregator(_Aggregator(), _settings(
        mode="distributed", min_clients=4, noise_multiplier=z, secure_noise=False), RUN_SEED)
    updates = _updates(clients=1)
    adapter = dp.aggregate(updates, None, server_round=2, sampled=m, ranks=[2],
                           first_base=_base())
    topped = factor_release(updates, _base(), ClientLevelDP(1.0, z * math.sqrt(3 / 4), m,
                                                         clip=False), _noise(2))
    assert torch.equal(adapter.factors["m"].B, topped.factors["m"].B)
    assert dp.metrics()["dp_noise_std"] == pytest.approx(z * 1.0 / m)  # z C / m in all


def test_the_accountant_is_charged_the_rate_used_and_the_divisor_is_the_expected_cohort():
    dp = ClientLevelDPAggregator(_Aggregator(), _settings(), RUN_SEED)
    updates = _updates(clients=1)  # one client replied of an expected cohort of 2.5
    adapter = dp.aggregate(updates, None, server_round=1, sampled=2.5, ranks=[2],
                           sample_rate=0.8, first_base=_base())
    expected = factor_release(updates, _base(), ClientLevelDP(1.0, 1.0, 2.5), _noise(1))
    assert torch.equal(adapter.factors["m"].A, expected.factors["m"].A)
    assert dp.accountant.history == [(1.0, 0.8, 1)]
    assert dp.report()["sample_rate_max_used"] == 0.8
    assert "Poisson" in dp.report()["neighbouring"]


def test_a_round_without_updates_releases_noise_and_is_charged():
    """Nobody sampled: the release is the base plus the round's noise, as in any round
    (whether a round releases must not depend on who was drawn)."""
    dp = ClientLevelDPAggregator(_Aggregator(), _settings(), RUN_SEED)
    base = {"m": _updates(clients=1)[0].start["m"]}
    adapter = dp.aggregate([], None, server_round=1, sampled=2, ranks=[2], first_base=base)
    noise = _noise(1)
    A = base["m"].A.double() + noise.sample(base["m"].A.shape, 0.5, torch.float64)
    B = base["m"].B.double() + noise.sample(base["m"].B.shape, 0.5, torch.float64)
    assert torch.equal(adapter.factors["m"].A, A.to(base["m"].A.dtype))
    assert torch.equal(adapter.factors["m"].B, B.to(base["m"].B.dtype))
    assert dp.accountant.history == [(1.0, 0.5, 1)]


def test_norm_statistics_only_in_a_reproducible_experiment_and_from_clipped_norms():
    """Both raw norms are above the clip norm 1.0: an experiment sees mean = max = 1.0,
    a private run no norm statistic at all."""
    experiment = ClientLevelDPAggregator(_Aggregator(), _settings(secure_noise=False), RUN_SEED)
    experiment.aggregate(_updates(), None, server_round=1, sampled=2, ranks=[2, 2],
                           first_base=_base())
    metrics = experiment.metrics()
    assert metrics["dp_update_norm_max"] == metrics["dp_update_norm_mean"] == 1.0
    assert metrics["dp_clipped_fraction"] == 1.0
    private = ClientLevelDPAggregator(_Aggregator(), _settings(secure_noise=True), RUN_SEED)
    private.aggregate(_updates(), None, server_round=1, sampled=2, ranks=[2, 2],
                           first_base=_base())
    assert "dp_update_norm_max" not in private.metrics()


def test_the_budget_stops_before_the_round_that_would_overspend_and_survives_a_restart():
    one_round = epsilon_after([(1.0, 0.5, 1)], 1e-5)
    dp = ClientLevelDPAggregator(_Aggregator(), _settings(budget=one_round), RUN_SEED)
    assert dp.stop_before(1) is None
    dp.aggregate(_updates(), None, server_round=1, sampled=2, ranks=[2, 2],
                           first_base=_base())
    reason = dp.stop_before(2)
    assert reason is not None and reason.startswith("privacy budget: round 2") and dp.stopped
    restored = ClientLevelDPAggregator(_Aggregator(), _settings(budget=one_round), RUN_SEED)
    restored.load_state(dp.state())
    assert restored.accountant.history == dp.accountant.history
    assert restored.stopped == dp.stopped and not restored.budget_left_for_next_round()


def test_secure_noise_does_not_come_from_the_run_seed():
    dp = ClientLevelDPAggregator(_Aggregator(), _settings(secure_noise=True), RUN_SEED)
    assert dp.noise(1).secure
    assert not ClientLevelDPAggregator(_Aggregator(), _settings(), RUN_SEED).noise(1).secure


def test_an_aggregator_without_a_dp_form_is_refused():
    with pytest.raises(PrivacyError, match="no client-level DP form"):
        ClientLevelDPAggregator(_Aggregator(dp_form=None), _settings(), RUN_SEED)
    with pytest.raises(ValueError, match="DP mode"):
        _settings(mode="none")
