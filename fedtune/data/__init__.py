"""Federated text data: natural partitions (Shakespeare roles, chitchat users, JSONL
clients), pooled IID / Dirichlet partitions, and packing."""

from __future__ import annotations

from typing import Any

from fedtune.data.chitchat import grouped_pairs, load_chitchat
from fedtune.data.jsonl import format_record, load_jsonl
from fedtune.data.partition import (
    cap_samples,
    check_eval_fraction,
    dirichlet_partition,
    iid_partition,
    select_clients,
    split_train_eval,
)
from fedtune.data.shakespeare import grouped_speeches, load_shakespeare
from fedtune.data.tokenize import IGNORE_INDEX, PackedData, labels_for, pack, pack_texts
from fedtune.data.types import ClientData, DataError

SOURCES = ("shakespeare", "chitchat", "jsonl")

__all__ = [
    "IGNORE_INDEX",
    "SOURCES",
    "ClientData",
    "DataError",
    "PARTITIONS",
    "PackedData",
    "cap_samples",
    "clients_of",
    "format_record",
    "iid_partition",
    "labels_for",
    "load_clients",
    "load_jsonl",
    "load_shakespeare",
    "pack",
    "pack_texts",
    "select_clients",
    "split_train_eval",
]


def load_clients(
    source: str,
    path: str | None = None,
    num_clients: int | None = None,
    min_lines: int = 64,
    eval_fraction: float = 0.1,
    seed: int = 0,
    max_samples_per_client: int | None = None,
    partition: str = "natural",
    alpha: float = 0.5,
    group_by: str = "",
) -> list[ClientData]:
    """Clients of a named source, so configs can pick the data with one string.

    ``partition``: "natural" (Shakespeare roles, chitchat users, JSONL clients; at least
    ``min_lines`` lines / responses each), "iid" (every sample pooled and dealt evenly)
    or "dirichlet" (label skew over ``group_by`` with concentration ``alpha``). For
    ``jsonl``, ``path`` is required and ``min_lines`` is ignored; ``num_clients`` and
    ``max_samples_per_client`` select and cap as they do for Shakespeare.
    """
    if partition != "natural":
        return pooled_clients(grouped_samples(source, path, group_by), partition,
                              num_clients or 1, alpha, eval_fraction, seed,
                              max_samples_per_client)
    if source == "shakespeare":
        return load_shakespeare(num_clients, min_lines, eval_fraction, seed, max_samples_per_client)
    if source == "chitchat":
        return load_chitchat(num_clients, min_lines, eval_fraction, seed, max_samples_per_client)
    if source == "jsonl":
        if path is None:
            raise DataError("data source 'jsonl' needs a path (a *.jsonl file or a directory)")
        clients = load_jsonl(path, eval_fraction=eval_fraction, seed=seed)
        return _subset(clients, num_clients, seed, max_samples_per_client)
    raise DataError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")


PARTITIONS = ("natural", "iid", "dirichlet")


def clients_of(data: Any, seed: int) -> list[ClientData]:
    """The clients a scenario's ``[data]`` section (a ``fedtune.config.DataSpec``) names."""
    return load_clients(
        source=data.source, path=data.path or None, num_clients=data.num_clients,
        min_lines=data.min_lines, eval_fraction=data.eval_fraction, seed=seed,
        max_samples_per_client=data.max_samples_per_client or None,
        partition=data.partition, alpha=data.dirichlet_alpha, group_by=data.group_by)


def grouped_samples(source: str, path: str | None, group_by: str) -> list[tuple[str, str]]:
    """Every sample of a source as (text, group), for the pooled partitions."""
    if source == "shakespeare":
        return grouped_speeches(group_by or "genre")
    if source == "chitchat":
        return grouped_pairs(group_by or "sender")
    if source == "jsonl":
        if group_by not in ("", "client"):
            raise DataError(f"data.group_by = {group_by!r} is not a jsonl key; allowed: client")
        if path is None:
            raise DataError("data source 'jsonl' needs a path (a *.jsonl file or a directory)")
        return [(text, c.client_id) for c in load_jsonl(path, eval_fraction=0.5, seed=0)
                for text in [*c.train, *c.eval]]
    raise DataError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")


def pooled_clients(samples: list[tuple[str, str]], partition: str, num_clients: int,
                   alpha: float, eval_fraction: float, seed: int, max_samples: int | None
                   ) -> list[ClientData]:
    """Clients cut from the pooled samples: IID shards or Dirichlet label skew; each
    client's texts split into train / held-out like a natural client's."""
    check_eval_fraction(eval_fraction)
    if partition == "iid":
        if len(samples) < 2 * num_clients:
            raise DataError(f"{len(samples)} samples cannot give {num_clients} clients two "
                            "each (one to train, one held out)")
        shards = iid_partition(list(range(len(samples))), num_clients, seed)
    elif partition == "dirichlet":
        shards = dirichlet_partition([g for _, g in samples], num_clients, alpha, seed)
    else:
        raise DataError(f"data.partition = {partition!r}; allowed: {', '.join(PARTITIONS)}")
    clients = []
    for number, shard in enumerate(shards):
        cid = f"{partition}-{number:04d}"
        train, held_out = split_train_eval([samples[i][0] for i in shard], eval_fraction,
                                           f"{seed}:{cid}")
        clients.append(ClientData(cid, cap_samples(train, max_samples, f"{seed}:{cid}:cap"),
                                  held_out))
    return clients


def _subset(
    clients: list[ClientData], num_clients: int | None, seed: int, max_samples: int | None
) -> list[ClientData]:
    """Seeded choice of clients and cap on their training samples."""
    by_id = {c.client_id: c for c in clients}
    chosen = select_clients(list(by_id), num_clients, seed)
    return [
        ClientData(
            client_id=cid,
            train=cap_samples(by_id[cid].train, max_samples, f"{seed}:{cid}:cap"),
            eval=by_id[cid].eval,
        )
        for cid in chosen
    ]
