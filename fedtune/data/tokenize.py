"""Turn a client's texts into fixed-length token blocks for causal LM training.

Texts are concatenated with an eos token after each one and cut into blocks of
``seq_len``: no padding is wasted and every position is a real prediction target.
Special tokens such as BOS are not added per text (eos is the separator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100  # label value that the causal LM loss skips


@dataclass(frozen=True)
class PackedData:
    """Token blocks and their labels (``IGNORE_INDEX`` where the block is padding)."""

    input_ids: torch.Tensor  # [n, seq_len], int64
    labels: torch.Tensor  # [n, seq_len], int64

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the blocks."""
        return int((self.labels != IGNORE_INDEX).sum())


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (one input, one target), got {seq_len!r}")


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; packing needs it to separate texts")
    return int(eos)


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its eos id when it defines no pad token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return _eos_id(tokenizer) if pad is None else int(pad)


def token_stream(texts: list[str], tokenizer: Any) -> list[int]:
    """All texts tokenized (no special tokens) and joined, each followed by eos."""
    eos = _eos_id(tokenizer)
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(eos)
    return stream


def pack_texts(texts: list[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Full ``[n, seq_len]`` int64 blocks of the eos-separated token stream.

    The tail that does not fill a block is dropped, so fewer than ``seq_len`` tokens in
    total gives a ``[0, seq_len]`` tensor: callers must handle zero rows (or use
    ``pack(..., pad_last=True)``).
    """
    _check_seq_len(seq_len)
    stream = token_stream(texts, tokenizer)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def pack(texts: list[str], tokenizer: Any, seq_len: int, pad_last: bool = False) -> PackedData:
    """Like ``pack_texts`` but with labels; ``pad_last`` keeps the tail as one padded block.

    Padding labels are masked exactly (by position), which stays correct when the
    tokenizer's pad id equals its eos id.
    """
    _check_seq_len(seq_len)
    stream = token_stream(texts, tokenizer)
    full = len(stream) // seq_len
    tail = len(stream) - full * seq_len if pad_last else 0
    rows = full + (1 if tail else 0)
    input_ids = torch.full((rows, seq_len), pad_id_of(tokenizer), dtype=torch.long)
    input_ids.view(-1)[: full * seq_len + tail] = torch.tensor(
        stream[: full * seq_len + tail], dtype=torch.long
    )
    labels = input_ids.clone()
    labels.view(-1)[full * seq_len + tail :] = IGNORE_INDEX
    return PackedData(input_ids=input_ids, labels=labels)


def labels_for(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Labels for causal LM loss: a copy of the ids with ``pad_id`` positions set to -100.

    Every ``pad_id`` is masked, so when pad id == eos id the eos separators are masked
    too; ``pack`` avoids that by masking padding by position.
    """
    labels = input_ids.clone()
    labels[input_ids == pad_id] = IGNORE_INDEX
    return labels
