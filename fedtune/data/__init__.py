"""Federated text data: natural partitions (Shakespeare roles, JSONL clients) and packing."""

from __future__ import annotations

from fedtune.data.jsonl import format_record, load_jsonl
from fedtune.data.partition import cap_samples, iid_partition, select_clients, split_train_eval
from fedtune.data.shakespeare import load_shakespeare
from fedtune.data.tokenize import IGNORE_INDEX, PackedData, labels_for, pack, pack_texts
from fedtune.data.types import ClientData, DataError

SOURCES = ("shakespeare", "jsonl")

__all__ = [
    "IGNORE_INDEX",
    "SOURCES",
    "ClientData",
    "DataError",
    "PackedData",
    "cap_samples",
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
) -> list[ClientData]:
    """Clients of a named source, so configs can pick the data with one string.

    For ``jsonl``, ``path`` is required and ``min_lines`` is ignored; ``num_clients``
    and ``max_samples_per_client`` select and cap as they do for Shakespeare.
    """
    if source == "shakespeare":
        return load_shakespeare(num_clients, min_lines, eval_fraction, seed, max_samples_per_client)
    if source == "jsonl":
        if path is None:
            raise DataError("data source 'jsonl' needs a path (a *.jsonl file or a directory)")
        clients = load_jsonl(path, eval_fraction=eval_fraction, seed=seed)
        return _subset(clients, num_clients, seed, max_samples_per_client)
    raise DataError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")


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
