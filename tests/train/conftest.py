"""Fixtures for training tests: a tiny random Llama built in milliseconds (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 260  # 256 byte ids + a few specials


def tiny_llama(seed: int = 0, dropout: float = 0.0) -> LlamaForCausalLM:
    """Two-layer Llama with random weights, reproducible from ``seed``."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        attention_dropout=dropout,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def byte_blocks(text: str, seq_len: int) -> torch.Tensor:
    """Full ``[n, seq_len]`` blocks of the text's UTF-8 bytes used as token ids."""
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def make_model() -> Callable[..., LlamaForCausalLM]:
    """Factory for tests that need several models or dropout."""
    return tiny_llama


@pytest.fixture
def verse_blocks() -> torch.Tensor:
    """A short line repeated: easy for a tiny model to learn, in 32-byte blocks."""
    return byte_blocks("To be, or not to be, that is the question. " * 12, 32)


@pytest.fixture
def random_blocks() -> torch.Tensor:
    """Twelve distinct rows; row i starts with token i so tests can tell rows apart."""
    blocks = torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(0))
    blocks[:, 0] = torch.arange(12)
    return blocks


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on small VMs threads cost ~100x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
