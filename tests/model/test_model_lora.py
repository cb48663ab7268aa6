from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedtune.model import (
    LoraSpec,
    ModelSpec,
    adapter_state,
    attach_lora,
    base_model_name,
    load_adapter_state,
    load_base_model,
    reset_lora,
    save_peft_adapter,
)

QV_KEYS = 2 * 2 * 2  # layers x (q, v) x (A, B)


def _logits(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**enc).logits


def _a_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.endswith("lora_A.weight")]


@pytest.mark.parametrize(
    "kwargs",
    [{"rank": 0}, {"alpha": 0.0}, {"dropout": 1.0}, {"dropout": -0.1}, {"target_modules": ()}],
)
def test_lora_spec_validation(kwargs: dict) -> None:
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=field):
        LoraSpec(**kwargs)


def test_lora_spec_scale_and_hashable() -> None:
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=["q_proj"])  # a list is normalised
    assert spec.scale == 2.0
    assert spec.target_modules == ("q_proj",)
    assert spec == LoraSpec(rank=4, alpha=8, target_modules=("q_proj",))  # int alpha normalised
    assert hash(spec) == hash(LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj",)))


def test_attach_uses_peft_keys_and_starts_at_base_model(make_peft, batch) -> None:
    base, tokenizer = load_base_model(ModelSpec(source="tiny"))
    enc = batch(tokenizer)
    before = _logits(base, enc)
    model = attach_lora(base, LoraSpec(), seed=0)
    assert not any(m.training for m in model.modules())  # deterministic until .train()
    state = adapter_state(model)
    assert len(state) == QV_KEYS
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    assert state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 8)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    assert all(torch.count_nonzero(state[k]) == 0 for k in state if "lora_B" in k)
    assert torch.equal(_logits(model, enc), before)  # B = 0: the adapter starts as a no-op


def test_same_seed_same_adapter_different_seed_differs(make_peft) -> None:
    first = adapter_state(make_peft(seed=7)[0])
    again = adapter_state(make_peft(seed=7)[0])
    other = adapter_state(make_peft(seed=8)[0])
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(not torch.equal(first[k], other[k]) for k in _a_keys(first))
    bound = 1 / 64**0.5  # kaiming-uniform(a=sqrt 5) bound for fan_in = hidden = 64
    assert all(0.5 * bound < first[k].abs().max() <= bound for k in _a_keys(first))


def test_attach_does_not_disturb_global_rng(make_peft) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    make_peft(seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_reset_lora_restores_seeded_state(make_peft, randomize_lora) -> None:
    model, _ = make_peft(seed=3)
    initial = adapter_state(model)
    randomize_lora(model)
    assert not torch.equal(adapter_state(model)[_a_keys(initial)[0]], initial[_a_keys(initial)[0]])
    reset_lora(model, seed=3)
    restored = adapter_state(model)
    assert all(torch.equal(restored[k], initial[k]) for k in initial)
    reset_lora(model, seed=4)  # one model can serve a client with another seed
    fresh = adapter_state(make_peft(seed=4)[0])
    assert all(torch.equal(adapter_state(model)[k], fresh[k]) for k in fresh)


def test_adapter_state_is_a_detached_copy(make_peft) -> None:
    model, _ = make_peft()
    state = adapter_state(model)
    key = _a_keys(state)[0]
    state[key].add_(1.0)
    assert not torch.equal(adapter_state(model)[key], state[key])
    assert not any(v.requires_grad for v in state.values())


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_adapter_state_round_trip_is_exact(
    make_peft, randomize_lora, batch, quantization: str
) -> None:
    source, tokenizer = make_peft(seed=1, quantization=quantization)
    randomize_lora(source)
    state = adapter_state(source)
    target, _ = make_peft(seed=2, quantization=quantization)
    load_adapter_state(target, state)
    loaded = adapter_state(target)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    enc = batch(tokenizer)
    assert torch.equal(_logits(source, enc), _logits(target, enc))


def test_load_adapter_state_rejects_mismatches(make_peft) -> None:
    model, _ = make_peft(spec=LoraSpec(rank=8))
    good = adapter_state(model)
    small = adapter_state(make_peft(spec=LoraSpec(rank=4))[0])
    with pytest.raises(ValueError, match=r"shape.*\(4, 64\).*\(8, 64\)"):
        load_adapter_state(model, small)
    missing = dict(good)
    dropped = missing.pop(_a_keys(good)[0])
    with pytest.raises(ValueError, match="missing keys: .*q_proj.lora_A"):
        load_adapter_state(model, missing)
    extra = dict(good) | {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": dropped}
    with pytest.raises(ValueError, match="unexpected keys: .*up_proj"):
        load_adapter_state(model, extra)
    after = adapter_state(model)
    assert all(torch.equal(after[k], good[k]) for k in good)  # failed loads change nothing


def test_unknown_target_module_lists_real_ones() -> None:
    base, _ = load_base_model(ModelSpec(source="tiny"))
    with pytest.raises(ValueError) as err:
        attach_lora(base, LoraSpec(target_modules=("q_proj", "query")), seed=0)
    message = str(err.value)
    assert "'query'" in message and "match no module" in message
    for name in ("q_proj", "v_proj", "down_proj"):
        assert name in message


@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_backward_reaches_only_lora(make_peft, batch, quantization: str) -> None:
    model, tokenizer = make_peft(quantization=quantization)
    model.train()
    enc = batch(tokenizer)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    loss = model(**enc, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(with_grad) == QV_KEYS and all("lora_" in n for n in with_grad)
    b_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in b_grads)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_saved_adapter_loads_with_peft(
    tmp_path: Path, make_peft, randomize_lora, batch, quantization: str
) -> None:
    spec = LoraSpec(rank=4, alpha=12.0)
    model, tokenizer = make_peft(quantization=quantization, spec=spec)
    randomize_lora(model)
    out = tmp_path / "adapter"
    name = base_model_name(ModelSpec(source="tiny"))
    assert save_peft_adapter(out, adapter_state(model), spec, name) == out
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp dirs left behind
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
        4,
        12.0,
        "tiny",
    )

    fresh, _ = load_base_model(ModelSpec(source="tiny", quantization=quantization))
    reloaded = PeftModel.from_pretrained(fresh, out)
    enc = batch(tokenizer)
    assert torch.equal(_logits(reloaded, enc), _logits(model, enc))


def test_saved_adapter_with_mixed_ranks_keeps_scale(
    tmp_path: Path, make_peft, randomize_lora, batch
) -> None:
    """An aggregator may hand back other ranks; the exported scale must stay alpha/rank."""
    model, tokenizer = make_peft(spec=LoraSpec(rank=8, alpha=16.0))
    randomize_lora(model)
    state = adapter_state(model)
    for key in [k for k in state if ".v_proj." in k]:  # truncate v_proj to rank 4
        state[key] = state[key][:4] if "lora_A" in key else state[key][:, :4].contiguous()
        state[key] = state[key].contiguous()
    save_peft_adapter(tmp_path / "mixed", state, LoraSpec(rank=8, alpha=16.0), "tiny")
    config = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] == {
        "model.layers.0.self_attn.v_proj": 4,
        "model.layers.1.self_attn.v_proj": 4,
    }

    zeroed = adapter_state(model)  # same effect in memory: v_proj rank components 4.. = 0
    for key in [k for k in zeroed if ".v_proj." in k]:
        if "lora_A" in key:
            zeroed[key][4:] = 0
        else:
            zeroed[key][:, 4:] = 0
    load_adapter_state(model, zeroed)
    fresh, _ = load_base_model(ModelSpec(source="tiny"))
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "mixed")
    enc = batch(tokenizer)
    torch.testing.assert_close(_logits(reloaded, enc), _logits(model, enc))

    save_peft_adapter(tmp_path / "mixed", state, LoraSpec(), "tiny", rank=4, alpha=8.0)
    config = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["alpha_pattern"] == {
        "model.layers.0.self_attn.q_proj": 16.0,
        "model.layers.1.self_attn.q_proj": 16.0,
    }


def test_base_model_name() -> None:
    assert base_model_name(ModelSpec()) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_name(ModelSpec(source="tiny:3")) == "tiny:3"
    assert base_model_name(ModelSpec(source="org/model")) == "org/model"
