"""Byzantine-robust aggregators (geomedian, multikrum) in factored form, against dense
float64 references written here independently: the same algorithms on the dense,
flattened updates (as Flower's Krum works), which fedtune itself never forms."""

from __future__ import annotations

import pytest
import torch
from lora_reference import dense, rel

from fedtune.aggregation import get_aggregator
from fedtune.aggregation.base import AggregationError
from fedtune.config import ConfigError, load_scenario
from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors
from fedtune.core.lowrank import product_gram

MODULES = ("q", "v")
RANKS = [2, 8, 4, 3, 6, 5]
EXAMPLES = [10, 300, 55, 7, 40, 90]
SCALES = [2.0, 0.5, 1.0, 0.25, 1.5, 1.0]


def flat(update: ClientUpdate) -> torch.Tensor:
    """The whole update as one dense float64 vector (every module, in order)."""
    return torch.cat([dense(update.factors[m]).flatten() for m in MODULES])


def weights_of(updates: list[ClientUpdate]) -> torch.Tensor:
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    return n / n.sum()


def dense_geomedian(updates, smoothing=1e-6, iterations=100, tolerance=1e-8):
    points = torch.stack([flat(u) for u in updates])
    p = weights_of(updates)
    z = p @ points
    for _ in range(iterations):
        d = (points - z).norm(dim=1).clamp_min(smoothing)
        w = p / d
        new = (w / w.sum()) @ points
        moved = (new - z).norm()
        z = new
        if moved <= tolerance * z.norm():
            break
    return z


def dense_multikrum(updates, byzantine=1, keep=0):
    points = torch.stack([flat(u) for u in updates])
    n = len(updates)
    scores = []
    for i in range(n):
        d = sorted(float((points[i] - points[j]).pow(2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: max(1, n - byzantine - 2)]))
    chosen = sorted(sorted(range(n), key=lambda k: (scores[k], k))[: keep or n - byzantine])
    p = weights_of(updates)[chosen]
    return (p / p.sum()) @ points[chosen], chosen


def as_flat(adapter: GlobalAdapter) -> torch.Tensor:
    return torch.cat([adapter.delta(m).double().flatten() for m in MODULES])


def with_outlier(honest, boost=50.0):
    """The honest mixed-rank updates and one attacker (last): another client's update,
    sign-flipped and boosted, claiming an ordinary number of examples."""
    copied = honest[2]
    evil = {m: LoraFactors(A=f.A, B=-boost * f.B, scale=f.scale)
            for m, f in copied.factors.items()}
    return [*honest, ClientUpdate(evil, num_examples=60, client_id="evil")]


def test_the_product_gram_is_the_dense_inner_products(updates_factory) -> None:
    updates = updates_factory(RANKS, EXAMPLES, scales=SCALES)
    parts = [u.factors["q"] for u in updates]
    dense_flat = torch.stack([dense(p).flatten() for p in parts])
    assert rel(product_gram(parts), dense_flat @ dense_flat.T) < 1e-12


@pytest.mark.parametrize("attacked", [False, True])
@pytest.mark.parametrize("smoothing", [1e-6, 300.0])  # updates are ~100-1000 apart
def test_geomedian_equals_the_dense_reference(updates_factory, attacked, smoothing) -> None:
    updates = updates_factory(RANKS, EXAMPLES, scales=SCALES)
    updates = with_outlier(updates) if attacked else updates
    aggregator = get_aggregator("geomedian", rank_budget=64, gm_smoothing=smoothing)
    adapter = aggregator.aggregate(updates, None)
    assert aggregator.last_truncation_error < 1e-6  # total rank 28 (or 32) fits 64
    assert rel(as_flat(adapter), dense_geomedian(updates, smoothing)) < 1e-5
    assert aggregator.metrics()["gm_iterations"] > 1 or smoothing > 1


@pytest.mark.parametrize(("byzantine", "keep"), [(1, 0), (2, 0), (1, 1), (2, 3)])
def test_multikrum_equals_the_dense_reference(updates_factory, byzantine, keep) -> None:
    updates = with_outlier(updates_factory(RANKS, EXAMPLES, scales=SCALES))
    aggregator = get_aggregator("multikrum", krum_byzantine=byzantine, krum_keep=keep)
    adapter = aggregator.aggregate(updates, None)
    expected, chosen = dense_multikrum(updates, byzantine, keep)
    assert aggregator.last_selected == chosen
    assert 6 not in chosen  # the attacker is never selected
    assert rel(as_flat(adapter), expected) < 1e-5


def on_a_line(values: list[float]) -> list[ClientUpdate]:
    """Rank-1 updates x * E_11 (one module): points on a line, distances by hand."""
    e_in, e_out = torch.zeros(1, 5), torch.zeros(3, 1)
    e_in[0, 0], e_out[0, 0] = 1.0, 1.0
    return [ClientUpdate({"q": LoraFactors(A=e_in, B=x * e_out)}, num_examples=1)
            for x in values]


def test_multikrum_scores_by_hand() -> None:
    """Points 0, 1, 2, 10, 11, f = 1: each scored on its n - f - 2 = 2 nearest, so the
    scores are 5, 2, 5, 65, 82; keeping 2 takes 1 and (tie, lower index) 0."""
    aggregator = get_aggregator("multikrum", krum_byzantine=1, krum_keep=2)
    adapter = aggregator.aggregate(on_a_line([0.0, 1.0, 2.0, 10.0, 11.0]), None)
    assert aggregator.last_selected == [0, 1]
    assert float(adapter.delta("q")[0, 0]) == pytest.approx(0.5)


def test_geomedian_of_points_on_a_line_is_their_median() -> None:
    adapter = get_aggregator("geomedian", gm_iterations=500, gm_tolerance=0.0).aggregate(
        on_a_line([0.0, 1.0, 2.0, 10.0, 11.0]), None)
    assert float(adapter.delta("q")[0, 0]) == pytest.approx(2.0, abs=1e-3)


def test_robust_aggregates_ignore_a_boosted_attacker_the_mean_follows(updates_factory) -> None:
    honest = updates_factory(RANKS, EXAMPLES, scales=SCALES)
    attacked = with_outlier(honest)
    mean_shift = (as_flat(get_aggregator("flora").aggregate(attacked, None))
                  - as_flat(get_aggregator("flora").aggregate(honest, None))).norm()
    for name in ("geomedian", "multikrum"):
        shift = (as_flat(get_aggregator(name).aggregate(attacked, None))
                 - as_flat(get_aggregator(name).aggregate(honest, None))).norm()
        assert shift < 0.1 * mean_shift, name


def test_previous_accumulates_and_the_budget_truncates(updates_factory) -> None:
    first_round = updates_factory([3, 5], [1, 1], dtype=torch.float64)
    updates = updates_factory(RANKS, EXAMPLES, scales=SCALES, dtype=torch.float64)
    previous = get_aggregator("flora").aggregate(first_round, None)
    aggregator = get_aggregator("geomedian", rank_budget=6)
    adapter = aggregator.aggregate(updates, previous)
    assert adapter.round == 2 and adapter.factors["q"].rank == 6
    exact = as_flat(previous) + dense_geomedian(updates)
    error = aggregator.last_truncation_errors["q"]
    assert error > 0.05
    got = adapter.delta("q").flatten()
    want = exact[: got.numel()]
    assert rel(got, want) == pytest.approx(error, rel=1e-6)


def test_multikrum_needs_more_replies_than_attackers(updates_factory) -> None:
    with pytest.raises(AggregationError, match="krum_byzantine"):
        get_aggregator("multikrum", krum_byzantine=2).aggregate(
            updates_factory([2, 2], [1, 1]), None)


@pytest.mark.parametrize("name", ["geomedian", "multikrum"])
def test_refused_under_secure_aggregation_and_client_level_dp(name) -> None:
    aggregator = f'federation.aggregator="{name}"'
    with pytest.raises(ConfigError, match="sees only their sum"):
        load_scenario("tiny", ["privacy.secure_aggregation=true", aggregator])
    with pytest.raises(ConfigError, match="does not bound its sensitivity"):
        load_scenario("tiny", ['privacy.mode="central"', "privacy.noise_multiplier=1.0",
                               aggregator])
    load_scenario("tiny", [aggregator])  # and accepted without either
