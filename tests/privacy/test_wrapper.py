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


def _noise(server_round):
    return GaussianNoise(server_noise_seed(round_seed(RUN_SEED, server_round)))


def test_a_factor_release_is_the_mechanisms_with_the_rounds_noise_seed():
    dp = ClientLevelDPAggregator(_Aggregator(), _settings(), RUN_SEED)
    updates = _updates()
    adapter = dp.aggregate(updates, None, server_round=3, sampled=4, ranks=[2, 2])
    expected = factor_release(updates, None, ClientLevelDP(1.0, 1.0, 4), _noise(3))
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
    adapter = dp.aggregate(updates, None, server_round=1, sampled=2, ranks=[2, 2])
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


def test_distributed_mode_neither_clips_nor_noises_and_reports_the_clients_norms():
    dp = ClientLevelDPAggregator(_Aggregator(), _settings(mode="distributed", min_clients=2),
                                 RUN_SEED)
    updates = _updates()
    adapter = dp.aggregate(updates, None, server_round=1, sampled=2, ranks=[2, 2])
    plain = factor_release(updates, None, ClientLevelDP(1.0, 1.0, 2, clip=False,
                                                        add_noise=False), GaussianNoise(0))
    assert torch.equal(adapter.factors["m"].B, plain.factors["m"].B)
    metrics = dp.metrics()
    assert metrics["dp_update_norm_max"] == 3.0 and metrics["dp_clipped_fraction"] == 1.0
    share = 1.0 * 1.0 / math.sqrt(2)
    assert dp.settings.client_noise_std == pytest.approx(share)
    assert metrics["dp_noise_std"] == pytest.approx(share * math.sqrt(2) / 2)


def test_the_budget_stops_before_the_round_that_would_overspend_and_survives_a_restart():
    one_round = epsilon_after([(1.0, 0.5, 1)], 1e-5)
    dp = ClientLevelDPAggregator(_Aggregator(), _settings(budget=one_round), RUN_SEED)
    assert dp.stop_before(1) is None
    dp.aggregate(_updates(), None, server_round=1, sampled=2, ranks=[2, 2])
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
