"""Pooled partitions (IID, Dirichlet label skew) and the chitchat natural partition."""

from __future__ import annotations

from collections import Counter

import pytest

from fedtune.data import DataError, load_clients
from fedtune.data.chitchat import dataset_file, pairs_by_sender
from fedtune.data.partition import dirichlet_partition
from fedtune.data.shakespeare import grouped_speeches

GROUPS = ["a"] * 600 + ["b"] * 300 + ["c"] * 100


def _dominant_share(shards: list[list[int]]) -> float:
    """Mean over clients of the share of their most common group."""
    shares = [Counter(GROUPS[i] for i in s).most_common(1)[0][1] / len(s) for s in shards]
    return sum(shares) / len(shares)


def test_dirichlet_gives_every_sample_once_in_equal_sizes() -> None:
    shards = dirichlet_partition(GROUPS, 40, alpha=0.1, seed=3)
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(len(GROUPS)))
    assert {len(s) for s in shards} == {25}


def test_small_alpha_skews_and_large_alpha_approaches_the_prior() -> None:
    skewed = _dominant_share(dirichlet_partition(GROUPS, 40, alpha=0.05, seed=0))
    mixed = _dominant_share(dirichlet_partition(GROUPS, 40, alpha=1000.0, seed=0))
    assert skewed > 0.9
    assert abs(mixed - 0.6) < 0.1  # the prior's largest group is 60 %


def test_dirichlet_is_seeded() -> None:
    assert dirichlet_partition(GROUPS, 10, 0.5, seed=1) == dirichlet_partition(GROUPS, 10, 0.5, 1)
    assert dirichlet_partition(GROUPS, 10, 0.5, seed=1) != dirichlet_partition(GROUPS, 10, 0.5, 2)


@pytest.mark.parametrize(("alpha", "clients", "match"), [
    (0.0, 10, "must be > 0"), (-1.0, 10, "must be > 0"), (0.5, 600, "cannot give 600")])
def test_dirichlet_bad_input(alpha: float, clients: int, match: str) -> None:
    with pytest.raises(DataError, match=match):
        dirichlet_partition(GROUPS, clients, alpha, seed=0)


def test_shakespeare_dirichlet_by_genre_for_a_thousand_clients() -> None:
    genre_of = {text: genre for text, genre in grouped_speeches("genre")}
    clients = load_clients("shakespeare", num_clients=1000, partition="dirichlet", alpha=0.1,
                           seed=0)
    assert len(clients) == 1000 and len({c.client_id for c in clients}) == 1000
    assert all(c.train and c.eval for c in clients)
    shares = [Counter(genre_of[t] for t in [*c.train, *c.eval]).most_common(1)[0][1]
              / len([*c.train, *c.eval]) for c in clients]
    assert sum(shares) / len(shares) > 0.9  # alpha 0.1: each client is mostly one genre
    texts = [t for c in clients for t in [*c.train, *c.eval]]
    assert len(texts) == len(set(texts))  # disjoint


def test_iid_shards_are_disjoint_and_even() -> None:
    clients = load_clients("shakespeare", num_clients=300, partition="iid", seed=0)
    sizes = [len(c.train) + len(c.eval) for c in clients]
    assert max(sizes) - min(sizes) <= 1
    texts = [t for c in clients for t in [*c.train, *c.eval]]
    assert len(texts) == len(set(texts))


def test_chitchat_natural_partition_is_one_user_each() -> None:
    by_sender = pairs_by_sender(str(dataset_file()))
    clients = load_clients("chitchat", num_clients=20, min_lines=100, seed=0,
                           max_samples_per_client=50)
    assert len(clients) == 20
    for c in clients:
        own = set(by_sender[c.client_id])
        assert set(c.train) <= own and set(c.eval) <= own and len(own) >= 100
        assert len(c.train) <= 50
        assert all([r for r, _ in t.messages] == ["user", "assistant"] for t in c.train)
        assert all(t.text == f"{t.messages[0][1]}\n{t.messages[1][1]}" for t in c.train)
    with pytest.raises(DataError, match="users have >= 100000 responses"):
        load_clients("chitchat", num_clients=2, min_lines=100000)


def test_unknown_group_key_is_refused() -> None:
    with pytest.raises(DataError, match="not a Shakespeare key"):
        load_clients("shakespeare", num_clients=10, partition="dirichlet", group_by="colour")
