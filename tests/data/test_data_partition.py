"""Seeded partition helpers."""

from __future__ import annotations

import pytest

from fedtune.data import DataError, cap_samples, iid_partition, select_clients, split_train_eval


def test_iid_partition_covers_every_sample_once() -> None:
    shards = iid_partition(list(range(103)), 4, seed=0)
    assert sorted(x for shard in shards for x in shard) == list(range(103))
    assert {len(s) for s in shards} <= {25, 26}
    assert shards == iid_partition(list(range(103)), 4, seed=0)
    assert shards != iid_partition(list(range(103)), 4, seed=1)
    with pytest.raises(DataError):
        iid_partition([1, 2], 3, seed=0)


def test_select_clients_keeps_order_and_is_seeded() -> None:
    ids = [f"c{i:02d}" for i in range(30)]
    chosen = select_clients(ids, 5, seed=0)
    assert len(chosen) == 5 and chosen == sorted(chosen) and set(chosen) <= set(ids)
    assert chosen == select_clients(ids, 5, seed=0) != select_clients(ids, 5, seed=1)
    assert select_clients(ids, None, seed=0) == ids
    with pytest.raises(DataError, match="only 30"):
        select_clients(ids, 31, seed=0)


def test_split_and_cap() -> None:
    train, held_out = split_train_eval(list(range(10)), 0.25, seed=0)
    assert len(held_out) == 2 and sorted(train + held_out) == list(range(10))
    assert split_train_eval([1, 2], 0.01, seed=0)[1] != []  # at least one eval sample
    with pytest.raises(DataError, match="eval_fraction"):
        split_train_eval([1, 2, 3], 1.0, seed=0)
    assert cap_samples(list(range(10)), 3, seed=0) == sorted(cap_samples(list(range(10)), 3, 0))
    assert len(cap_samples(list(range(10)), 3, seed=0)) == 3
    assert cap_samples([1, 2], None, seed=0) == [1, 2]
