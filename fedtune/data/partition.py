"""Seeded helpers for choosing clients and splitting their samples.

Every helper takes an explicit seed and uses its own ``random.Random`` so results do
not depend on (or disturb) global RNG state.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from fedtune.data.types import DataError

T = TypeVar("T")


def check_eval_fraction(eval_fraction: float) -> None:
    """Reject fractions that cannot leave both a train and an eval split."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")


def split_train_eval(
    samples: Sequence[T], eval_fraction: float, seed: int | str
) -> tuple[list[T], list[T]]:
    """Seeded shuffle, then the last ``eval_fraction`` (at least 1, at most n-1) is eval.

    Needs at least two samples so neither split is empty.
    """
    check_eval_fraction(eval_fraction)
    if len(samples) < 2:
        raise DataError(f"need at least 2 samples to split train/eval, got {len(samples)}")
    shuffled = list(samples)
    random.Random(seed).shuffle(shuffled)
    n_eval = min(len(shuffled) - 1, max(1, round(len(shuffled) * eval_fraction)))
    return shuffled[:-n_eval], shuffled[-n_eval:]


def select_clients(ids: Sequence[str], num_clients: int | None, seed: int) -> list[str]:
    """Pick ``num_clients`` ids (seeded), returned in their original order; None = all."""
    if num_clients is None:
        return list(ids)
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > len(ids):
        raise DataError(f"asked for {num_clients} clients but only {len(ids)} are eligible")
    chosen = set(random.Random(seed).sample(list(ids), num_clients))
    return [cid for cid in ids if cid in chosen]


def cap_samples(samples: Sequence[T], limit: int | None, seed: int | str) -> list[T]:
    """Keep a seeded random subset of at most ``limit`` samples, in their original order."""
    if limit is not None and limit < 1:
        raise DataError(f"max_samples_per_client must be >= 1, got {limit}")
    if limit is None or len(samples) <= limit:
        return list(samples)
    keep = set(random.Random(seed).sample(range(len(samples)), limit))
    return [s for i, s in enumerate(samples) if i in keep]


def iid_partition(samples: Sequence[T], num_clients: int, seed: int) -> list[list[T]]:
    """Deal a seeded shuffle of ``samples`` round-robin into ``num_clients`` near-equal shards.

    The IID baseline against which the natural (non-IID) partitions are compared.
    """
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if len(samples) < num_clients:
        raise DataError(f"cannot split {len(samples)} samples into {num_clients} non-empty shards")
    shuffled = list(samples)
    random.Random(seed).shuffle(shuffled)
    return [shuffled[i::num_clients] for i in range(num_clients)]


def dirichlet_partition(groups: Sequence[str], num_clients: int, alpha: float, seed: int
                        ) -> list[list[int]]:
    """Indices of samples per client, label-skewed over ``groups`` (a play's genre, a
    user...): each client draws its mix of groups q ~ Dirichlet(alpha * p), p the groups'
    overall shares (Hsu, Qi & Brown 2019), and takes its equal share of samples from the
    groups in that mix, without replacement. Small alpha: a client holds one or two
    groups; large alpha: close to IID. Every client gets len(groups) // num_clients
    samples (or one more), so none is left empty however small alpha is."""
    import numpy as np

    if not alpha > 0:
        raise DataError(f"data.dirichlet_alpha must be > 0, got {alpha}")
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if len(groups) < 2 * num_clients:
        raise DataError(f"{len(groups)} samples cannot give {num_clients} clients two each "
                        "(one to train, one held out)")
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    pools = [[i for i, g in enumerate(groups) if g == name] for name in names]
    for pool in pools:
        rng.shuffle(pool)
    prior = np.array([len(pool) for pool in pools], dtype=float) / len(groups)
    sizes = [len(groups) // num_clients + (k < len(groups) % num_clients)
             for k in range(num_clients)]
    shards: list[list[int]] = []
    for size in sizes:
        mix = rng.dirichlet(alpha * prior)
        shard: list[int] = []
        while len(shard) < size:  # a group that runs out passes its share to the others
            left = np.array([len(pool) for pool in pools], dtype=float)
            weights = mix * (left > 0)
            weights = weights / weights.sum() if weights.sum() > 0 else left / left.sum()
            for pool, count in zip(pools, rng.multinomial(size - len(shard), weights),
                                   strict=True):
                taken = min(int(count), len(pool))
                shard.extend(pool[len(pool) - taken:])
                del pool[len(pool) - taken:]
        shards.append(sorted(shard))
    return shards
