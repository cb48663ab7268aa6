"""Bounded influence (fedtune.aggregation.influence): norms clipped to a multiple of the
round's median, example counts capped likewise; honest rounds left as they are."""

from __future__ import annotations

import pytest
import torch
from lora_reference import make_update

from fedtune.aggregation import AggregationError, get_aggregator
from fedtune.aggregation.influence import InfluenceBound, factor_update_norm
from fedtune.core.adapters import ClientUpdate, LoraFactors


def with_start(gen, move: float, num_examples: int = 10, rank: int = 4) -> ClientUpdate:
    """An update whose move from its (random) start is ``move`` times a random one."""
    start = make_update(gen, rank, 1)
    step = make_update(gen, rank, 1)
    factors = {m: LoraFactors(A=s.A + move * d.A, B=s.B + move * d.B)
               for (m, s), d in zip(start.factors.items(), step.factors.values(), strict=True)}
    return ClientUpdate(factors, num_examples=num_examples, start=start.factors)


def test_an_honest_round_is_left_exactly_as_it_is(gen) -> None:
    updates = [with_start(gen, m, n) for m, n in [(1.0, 10), (1.3, 30), (0.8, 20)]]
    bound = InfluenceBound()
    assert bound.apply(updates) == updates
    assert bound.metrics()["influence-clipped"] == 0
    assert bound.metrics()["influence-capped"] == 0


def test_a_boosted_update_is_clipped_to_the_multiple_of_the_median(gen) -> None:
    updates = [with_start(gen, m) for m in (1.0, 1.1, 0.9, 1.05, 100.0)]
    norms = [factor_update_norm(u) for u in updates]
    bound = InfluenceBound(median_norm_multiple=2.0)
    out = bound.apply(updates)
    median = sorted(norms)[2]
    assert bound.metrics()["influence-norm-bound"] == pytest.approx(2 * median)
    assert factor_update_norm(out[4]) == pytest.approx(2 * median, rel=1e-6)
    assert out[:4] == updates[:4]
    # the clipped update moves along the attacker's own direction from its start
    s, f, g = updates[4].start["q"], updates[4].factors["q"], out[4].factors["q"]
    ratio = (g.B - s.B) / (f.B - s.B)
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))


def test_an_inflated_example_count_is_capped_and_the_mean_follows_the_honest(gen) -> None:
    honest = [with_start(gen, 1.0, n) for n in (10, 12, 9, 11)]
    liar = with_start(gen, 1.0, 100_000)
    bound = InfluenceBound(median_weight_multiple=4.0)
    out = bound.apply([*honest, liar])
    assert out[4].num_examples == 4 * 11  # median of 9, 10, 11, 12, 100000 is 11
    assert bound.metrics()["influence-examples-cap"] == 44
    total = sum(u.num_examples for u in out)
    # four honest clients' worth of weight: 44 / 86, where unbounded it would be 99.96 %
    assert out[4].num_examples / total == pytest.approx(44 / 86)


def test_off_means_off_and_the_multiples_are_validated(gen) -> None:
    updates = [with_start(gen, m, n) for m, n in [(1.0, 1), (1.0, 1), (100.0, 1000)]]
    assert InfluenceBound(0, 0).apply(updates) == updates
    for bad in (0.5, -1.0, float("inf")):
        with pytest.raises(ValueError, match="median_norm_multiple"):
            InfluenceBound(median_norm_multiple=bad)


def test_an_update_without_its_start_cannot_be_bounded(gen) -> None:
    with pytest.raises(AggregationError, match="needs the start"):
        InfluenceBound().apply([make_update(gen, 4, 1)])


def test_the_bound_caps_a_boosted_clients_pull_on_every_aggregator(gen) -> None:
    """One client of five sends 1000x its update: through the bound the mean moves by a
    few honest updates' worth at most, without it by hundreds."""
    honest = [with_start(gen, 1.0) for _ in range(4)]
    evil = with_start(gen, 1000.0)
    for name in ("fedavg", "flora"):
        aggregator = get_aggregator(name)
        clean = aggregator.aggregate(honest, None).delta("q")
        raw = aggregator.aggregate([*honest, evil], None).delta("q")
        bounded = aggregator.aggregate(InfluenceBound().apply([*honest, evil]), None).delta("q")
        honest_size = max(u.factors["q"].delta().norm() for u in honest)
        assert (bounded - clean).norm() < 3 * honest_size, name
        assert (raw - clean).norm() > 100 * honest_size, name
