"""Codec: peft state dict -> factors -> ArrayRecord -> factors -> peft state dict is exact."""

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.core.adapters import LoraFactors
from fedtune.core.codec import (
    CodecError,
    factors_from_state_dict,
    payload_nbytes,
    scale_folded_state_dict,
    state_dict_from_factors,
)
from fedtune.flower.messages import record_nbytes, record_to_factors, state_to_record


def _peft_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():  # B starts at zero: make it non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    return get_peft_model_state_dict(model)


def test_round_trip_through_array_record_is_exact():
    state = _peft_state()
    assert len(state) == 8  # 2 layers x (q, v) x (A, B)
    factors = factors_from_state_dict(state, scale=2.0)
    record = state_to_record(state_dict_from_factors(factors))
    back = state_dict_from_factors(record_to_factors(record, scale=2.0))
    assert list(back) == sorted(state)  # peft key names preserved
    for key, tensor in state.items():
        assert back[key].dtype == torch.float32
        assert torch.equal(back[key], tensor), key


def test_factors_group_by_module_with_shapes_and_scale():
    factors = factors_from_state_dict(_peft_state(), scale=2.0)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    assert name in factors
    f = factors[name]
    assert (f.rank, f.in_features, f.out_features, f.scale) == (4, 32, 32, 2.0)
    v = factors["base_model.model.model.layers.1.self_attn.v_proj"]
    assert v.out_features == 16  # 2 kv heads x head dim 8


def test_serialised_size_counts_real_bytes():
    state = _peft_state()
    expected = sum(t.numel() * 4 for t in state.values())
    assert payload_nbytes(state) == expected
    # the record adds numpy headers and the key names, nothing else of size
    assert expected < record_nbytes(state_to_record(state)) < expected + 200 * len(state)


def test_scale_folding_keeps_the_effective_update():
    factors = factors_from_state_dict(_peft_state(), scale=2.0)
    folded = factors_from_state_dict(scale_folded_state_dict(factors), scale=1.0)
    for name, f in factors.items():
        torch.testing.assert_close(folded[name].delta(), f.delta(), rtol=1e-6, atol=1e-6)


def test_bad_state_dicts_are_rejected_with_the_reason():
    state = _peft_state()
    lonely = {k: v for k, v in state.items() if "layers.0.self_attn.q_proj.lora_B" not in k}
    with pytest.raises(CodecError, match="only one of lora_A / lora_B"):
        factors_from_state_dict(lonely)
    with pytest.raises(CodecError, match="not a LoRA key"):
        factors_from_state_dict({"model.embed_tokens.weight": torch.zeros(2, 2)})
    key = "m.lora_A.weight"
    with pytest.raises(CodecError, match="rank mismatch"):
        factors_from_state_dict({key: torch.zeros(3, 5), "m.lora_B.weight": torch.zeros(4, 2)})


def test_lora_factors_validate_shapes():
    with pytest.raises(ValueError, match="rank mismatch"):
        LoraFactors(A=torch.zeros(3, 5), B=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="2-D"):
        LoraFactors(A=torch.zeros(3), B=torch.zeros(4, 3))
