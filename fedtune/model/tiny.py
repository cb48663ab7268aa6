"""A tiny random Llama and a file-free byte tokenizer, for tests and smoke runs.

It has the real module structure (q/k/v/o, gate/up/down, RMSNorm, lm_head) so LoRA,
quantization and aggregation run the same code paths as on a real model, in milliseconds.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from fedtune.model.sources import TINY_SHAPE

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)


def _byte_alphabet() -> list[str]:
    """Printable stand-in character for each byte, in byte order (the GPT-2 byte-level map).

    Must equal the map of ``pre_tokenizers.ByteLevel`` so token id == byte value.
    """
    printable = (
        set(range(ord("!"), ord("~") + 1))
        | set(range(ord("¡"), ord("¬") + 1))
        | set(range(ord("®"), ord("ÿ") + 1))
    )
    alphabet, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer built in memory: ids 0-255 are bytes, then <s>, </s>, <pad>."""
    vocab = {char: byte for byte, char in enumerate(_byte_alphabet())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """Two-layer Llama with GQA (4 query heads, 2 kv heads), vocab matching the tokenizer."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY_SHAPE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_model(
    seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Seeded random weights without touching the caller's global RNG stream."""
    tokenizer = build_byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(tokenizer))
    return model.to(dtype), tokenizer
