"""Plain data types shared by every data source.

A client's data is kept as raw text so that tokenization (which depends on the model)
happens late, on the client, with whatever tokenizer and sequence length the run uses.
"""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """Input data is missing or malformed; the message says what was looked for and where."""


@dataclass(frozen=True)
class ClientData:
    """One federated client's texts, already split into train and eval."""

    client_id: str
    train: list[str]
    eval: list[str]
