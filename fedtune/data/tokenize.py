"""Turn a client's texts into fixed-length token blocks for causal LM training.

Plain texts are concatenated with an eos token after each one and cut into blocks of
``seq_len``: no padding is wasted and every position is a real prediction target.
Special tokens such as BOS are not added per text (eos is the separator).

Conversations (``fedtune.data.chat``) are packed whole instead (``pack_examples``): the
position ids restart per example so no token attends to another example, and only the
example's own labels count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100  # label value that the causal LM loss skips


@dataclass(frozen=True)
class PackedData:
    """Token blocks and their labels (``IGNORE_INDEX`` where the block is padding or the
    loss skips a token); ``position_ids`` restart at 0 where each packed example begins
    (None: one running text per block, positions 0..seq_len-1)."""

    input_ids: torch.Tensor  # [n, seq_len], int64
    labels: torch.Tensor  # [n, seq_len], int64
    position_ids: torch.Tensor | None = None  # [n, seq_len], int64

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: torch.Tensor | slice) -> PackedData:
        """The blocks at ``index`` (a cap, a batch)."""
        positions = None if self.position_ids is None else self.position_ids[index]
        return PackedData(self.input_ids[index], self.labels[index], positions)

    @classmethod
    def blocks(cls, input_ids: torch.Tensor) -> PackedData:
        """Full blocks of running text: every token a target."""
        return cls(input_ids, input_ids)

    @classmethod
    def cat(cls, parts: list[PackedData]) -> PackedData:
        """Several clients' blocks as one set (the centralised baseline)."""
        positions = [p.position_ids for p in parts]
        if any(p is None for p in positions) and not all(p is None for p in positions):
            positions = [_positions_of(p) for p in parts]
        return cls(torch.cat([p.input_ids for p in parts]), torch.cat([p.labels for p in parts]),
                   None if positions[0] is None else torch.cat(positions))

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the blocks."""
        return int((self.labels != IGNORE_INDEX).sum())


def _positions_of(data: PackedData) -> torch.Tensor:
    """Explicit position ids of blocks that may have none."""
    if data.position_ids is not None:
        return data.position_ids
    return torch.arange(data.input_ids.shape[1]).expand_as(data.input_ids).clone()


@dataclass(frozen=True)
class Example:
    """One record's token ids and labels, before packing."""

    input_ids: list[int]
    labels: list[int]


def pack_examples(examples: list[Example], seq_len: int, pad_id: int) -> PackedData:
    """Examples packed whole into ``[n, seq_len]`` blocks with boundaries kept.

    Examples go into blocks in order; one that does not fit in what is left of a block
    starts the next (the rest is padding, labelled ``IGNORE_INDEX``); one longer than
    ``seq_len`` is cut to its first ``seq_len`` tokens. Position ids restart at 0 for each
    example, which is what makes transformers' attention block-diagonal (each token
    attends only to its own example; see ``fedtune.train.local``). Each example's first
    label is ignored: it would be predicted from the previous example's last token.
    """
    _check_seq_len(seq_len)
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        length = min(len(example.input_ids), seq_len)
        if length == 0:
            continue
        if len(ids) + length > seq_len:
            rows.append(_padded(ids, labels, positions, seq_len, pad_id))
            ids, labels, positions = [], [], []
        ids.extend(example.input_ids[:length])
        labels.extend([IGNORE_INDEX, *example.labels[1:length]])
        positions.extend(range(length))
    if ids:
        rows.append(_padded(ids, labels, positions, seq_len, pad_id))
    if not rows:
        empty = torch.empty((0, seq_len), dtype=torch.long)
        return PackedData(empty, empty.clone(), empty.clone())
    as_tensor = [torch.tensor(column, dtype=torch.long) for column in zip(*rows, strict=True)]
    return PackedData(*as_tensor)


def _padded(ids: list[int], labels: list[int], positions: list[int], seq_len: int,
            pad_id: int) -> tuple[list[int], list[int], list[int]]:
    """One block filled up with padding, whose positions count as a segment of their own."""
    missing = seq_len - len(ids)
    return (ids + [pad_id] * missing, labels + [IGNORE_INDEX] * missing,
            positions + list(range(missing)))


def pack_naively(examples: list[Example], seq_len: int) -> PackedData:
    """The examples' tokens and labels run together and cut into full blocks, as plain
    text is packed: tokens attend across examples. The baseline the benchmark compares
    ``pack_examples`` with, never used for training."""
    _check_seq_len(seq_len)
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    n = len(ids) // seq_len
    as_blocks = [torch.tensor(x[: n * seq_len], dtype=torch.long).view(n, seq_len)
                 for x in (ids, labels)]
    return PackedData(*as_blocks)


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
