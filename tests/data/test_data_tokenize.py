"""Packing texts into fixed-length token blocks."""

from __future__ import annotations

import pytest
import torch

from fedtune.data import IGNORE_INDEX, labels_for, pack, pack_texts

TEXTS = ["To be, or not to be: that is the question.", "Ay.", "Whether 'tis nobler in the mind"]


def stream_of(texts: list[str], tokenizer) -> list[int]:
    """Reference stream built independently: ids of each text, then eos."""
    out: list[int] = []
    for text in texts:
        out += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return out


@pytest.mark.parametrize("seq_len", [2, 7, 16, 32])
def test_pack_texts_shape_and_content(tokenizer, seq_len: int) -> None:
    blocks = pack_texts(TEXTS, tokenizer, seq_len)
    stream = stream_of(TEXTS, tokenizer)
    assert blocks.dtype == torch.long
    assert blocks.shape == (len(stream) // seq_len, seq_len)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert len(stream) - blocks.numel() < seq_len  # only a partial tail is dropped


def test_pack_texts_separates_texts_with_eos(tokenizer) -> None:
    blocks = pack_texts(TEXTS * 4, tokenizer, 8)
    flat = blocks.flatten().tolist()
    eos = tokenizer.eos_token_id
    assert flat.count(eos) >= len(TEXTS) * 4 - 1  # at most the last eos is in the dropped tail
    pieces = tokenizer.decode(flat).split("<eos>")
    assert pieces[: len(TEXTS)] == TEXTS
    assert tokenizer.bos_token_id not in flat  # no per-text special tokens besides eos


def test_pack_texts_too_short_gives_zero_rows(tokenizer) -> None:
    blocks = pack_texts(["Ay."], tokenizer, 64)
    assert blocks.shape == (0, 64)
    assert pack_texts([], tokenizer, 8).shape == (0, 8)


def test_pack_pad_last_masks_exactly_the_padding(tokenizer_without_pad) -> None:
    tok = tokenizer_without_pad  # pad id falls back to eos id: masking must go by position
    stream = stream_of(TEXTS, tok)
    packed = pack(TEXTS, tok, 16, pad_last=True)
    assert len(packed) == -(-len(stream) // 16)
    assert packed.num_tokens == len(stream)
    assert packed.input_ids.flatten()[: len(stream)].tolist() == stream
    assert packed.labels.flatten()[: len(stream)].tolist() == stream  # real eos kept
    assert (packed.labels.flatten()[len(stream) :] == IGNORE_INDEX).all()


def test_pack_without_pad_last_matches_pack_texts(tokenizer) -> None:
    packed = pack(TEXTS, tokenizer, 8)
    assert torch.equal(packed.input_ids, pack_texts(TEXTS, tokenizer, 8))
    assert torch.equal(packed.labels, packed.input_ids)


def test_labels_for_masks_pad_positions(tokenizer) -> None:
    ids = torch.tensor([[5, 6, 256, 256], [7, 256, 8, 9]])
    labels = labels_for(ids, pad_id=256)
    assert labels.tolist() == [[5, 6, -100, -100], [7, -100, 8, 9]]
    assert ids[0, 2] == 256  # input untouched


def test_seq_len_validated(tokenizer) -> None:
    with pytest.raises(ValueError, match="seq_len"):
        pack_texts(TEXTS, tokenizer, 1)
