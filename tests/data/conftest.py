"""Fixtures for data tests: a byte-level tokenizer built in memory (no downloads)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def byte_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    """256 byte tokens plus specials: ids 256 <pad>, 257 <eos>, 258 <bos>, 259 <unk>."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<pad>": 256, "<eos>": 257, "<bos>": 258, "<unk>": 259})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = {"eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
    if with_pad:
        specials["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_without_pad() -> PreTrainedTokenizerFast:
    return byte_tokenizer(with_pad=False)
