"""Chit-chat conversations partitioned by user: a natural federated split of dialogue.

The BYU Chit Chat Challenge data ships in the ``chitchat-dataset`` PyPI package as one
JSON file: conversations of turns, each turn a run of messages by one sender. Two
consecutive turns by different senders make an exchange, user message then assistant
message, and it belongs to the sender who responded: a client learns to answer the way its
user answers. As plain text (no chat template) an exchange is "prompt\nresponse". We read
the file without importing the package.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from fedtune.data.partition import (
    cap_samples,
    check_eval_fraction,
    select_clients,
    split_train_eval,
)
from fedtune.data.records import Conversation
from fedtune.data.types import ClientData, DataError

PACKAGE = "chitchat_dataset"
INSTALL_HINT = "pip install --no-deps chitchat-dataset==0.9.0"


def dataset_file() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data source 'chitchat' needs the {PACKAGE!r} package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with {INSTALL_HINT}")
    return path


def _turn_text(turn: list[dict[str, str]]) -> str:
    return " ".join(m["text"].strip() for m in turn if m.get("text", "").strip())


@functools.lru_cache(maxsize=2)
def pairs_by_sender(path: str) -> dict[str, tuple[Conversation, ...]]:
    """Every sender's exchanges (the other's turn as the user's message, theirs as the
    assistant's), in file order."""
    conversations = json.loads(Path(path).read_text(encoding="utf-8"))
    pairs: dict[str, list[Conversation]] = {}
    for conversation in conversations.values():
        turns = [t for t in conversation.get("messages", []) if t]
        for previous, turn in zip(turns, turns[1:], strict=False):
            sender = turn[0].get("sender", "")
            prompt, response = _turn_text(previous), _turn_text(turn)
            if sender and prompt and response and previous[0].get("sender") != sender:
                exchange = Conversation((("user", prompt), ("assistant", response)))
                pairs.setdefault(sender, []).append(exchange)
    return {sender: tuple(texts) for sender, texts in pairs.items()}


def load_chitchat(num_clients: int | None, min_pairs: int = 64, eval_fraction: float = 0.1,
                  seed: int = 0, max_samples_per_client: int | None = None
                  ) -> list[ClientData]:
    """One client per user with at least ``min_pairs`` responses (seeded choice)."""
    check_eval_fraction(eval_fraction)
    by_sender = pairs_by_sender(str(dataset_file()))
    eligible = sorted(s for s, texts in by_sender.items() if len(texts) >= max(2, min_pairs))
    if num_clients is not None and num_clients > len(eligible):
        raise DataError(f"asked for {num_clients} chitchat clients but only {len(eligible)} "
                        f"users have >= {min_pairs} responses; lower data.min_lines or "
                        "data.num_clients")
    clients = []
    for sender in select_clients(eligible, num_clients, seed):
        train, held_out = split_train_eval(list(by_sender[sender]), eval_fraction,
                                           f"{seed}:{sender}")
        train = cap_samples(train, max_samples_per_client, f"{seed}:{sender}:cap")
        clients.append(ClientData(client_id=sender, train=train, eval=held_out))
    return clients


def grouped_pairs(group_by: str = "sender") -> list[tuple[Conversation, str]]:
    """Every prompt/response pair as (text, sender) for pooled partitions."""
    if group_by != "sender":
        raise DataError(f"data.group_by = {group_by!r} is not a chitchat key; allowed: sender")
    by_sender = pairs_by_sender(str(dataset_file()))
    return [(text, sender) for sender in sorted(by_sender) for text in by_sender[sender]]
