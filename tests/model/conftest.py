"""Fixtures for fedtune.model tests: everything runs on the tiny random Llama on CPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedtune.model import LoraSpec, ModelSpec, attach_lora, load_base_model

TEXTS = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind"]


@pytest.fixture
def make_peft() -> Callable[..., tuple]:
    """Fresh tiny base + LoRA for each call (bases are mutated by peft, so never shared)."""

    def make(seed: int = 0, quantization: str = "none", spec: LoraSpec | None = None):
        spec_ = ModelSpec(source="tiny", quantization=quantization, device="cpu")
        base, tokenizer = load_base_model(spec_)
        return attach_lora(base, spec or LoraSpec(), seed=seed), tokenizer

    return make


@pytest.fixture
def batch() -> Callable:
    def encode(tokenizer) -> dict[str, torch.Tensor]:
        return dict(tokenizer(TEXTS, return_tensors="pt", padding=True))

    return encode


def _randomize_lora(model: torch.nn.Module, seed: int = 123) -> None:
    """Stand-in for local training: make A and B non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.fixture
def randomize_lora() -> Callable[..., None]:
    return _randomize_lora
