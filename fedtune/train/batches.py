"""One client's tokenised data, packed once per process.

A simulation worker (or a long-lived SuperNode process) serves many rounds and many
virtual clients; tokenising is keyed on what the data depends on only, so it happens once
per client and process. The ClientApp, compare's baselines and tests read the same blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from fedtune.config import DataSpec, Scenario
from fedtune.data import ClientData, PackedData, clients_of
from fedtune.data.chat import pack_records
from fedtune.model.loading import load_tokenizer


@dataclass(frozen=True)
class ClientBatch:
    """One client's tokenised partition: packed training and held-out blocks (see
    ``fedtune.data.chat.pack_records``: plain running text, or examples packed whole)."""

    client_id: str
    train: PackedData
    eval: PackedData


@functools.lru_cache(maxsize=4)
def _all_clients(data: DataSpec, seed: int) -> tuple[ClientData, ...]:
    return tuple(clients_of(data, seed))


@functools.lru_cache(maxsize=1024)
def _tokenised(data: DataSpec, seed: int, source: str, partition_id: int, seq_len: int
               ) -> ClientBatch:
    """Keyed on what the data depends on only, so other scenario keys never re-tokenise."""
    clients = _all_clients(data, seed)
    if not 0 <= partition_id < len(clients):
        raise ValueError(
            f"partition-id {partition_id} is out of range: the scenario has {len(clients)} clients"
        )
    return _pack_client(clients[partition_id], source, seq_len, data)


def _pack_client(client: ClientData, source: str, seq_len: int, data: DataSpec) -> ClientBatch:
    tokenizer = _tokenizer(source)
    train, held_out = (pack_records(records, tokenizer, seq_len, data.chat_template,
                                    data.assistant_only_loss, held_out=held)
                       for records, held in ((client.train, False), (client.eval, True)))
    held_out = held_out.rows(slice(0, data.max_eval_sequences or None))
    if len(train) == 0:
        raise ValueError(
            f"client {client.client_id} has no full training sequence of {seq_len} tokens; "
            "lower data.seq_len or raise data.min_lines"
        )
    return ClientBatch(client.client_id, train, held_out)


def client_batch(scenario: Scenario, partition_id: int, seq_len: int | None = None
                 ) -> ClientBatch:
    """The packed data of one simulated client (its partition of the scenario's data)."""
    return _tokenised(scenario.data, scenario.run.seed, scenario.model.source, partition_id,
                      seq_len or scenario.data.seq_len)


@functools.lru_cache(maxsize=8)
def _local_tokenised(path: str, name: str, data: DataSpec, seed: int, source: str,
                     seq_len: int) -> ClientBatch:
    from fedtune.data.local import load_local

    client = load_local(path, name, data.eval_fraction, seed, data.max_samples_per_client or None)
    return _pack_client(client, source, seq_len, data)


def local_batch(scenario: Scenario, path: str, name: str, seq_len: int | None = None
                ) -> ClientBatch:
    """The packed data of a deployed client: its own file (see ``load_local``)."""
    return _local_tokenised(path, name, scenario.data, scenario.run.seed, scenario.model.source,
                            seq_len or scenario.data.seq_len)


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str) -> Any:
    """One tokenizer per process (quantization does not change it)."""
    return load_tokenizer(source)
