"""One cached base serves LoRA adapters of several ranks, a frozen global adapter under a
trainable one (FLoRA residual training), and frozen-A training (FFA-LoRA)."""

import pytest
import torch

from fedtune.config import ModelSpec
from fedtune.model import cache
from fedtune.model.lora import (
    GLOBAL_ADAPTER,
    LoraSpec,
    activate,
    adapter_name,
    adapter_state,
    load_frozen_global,
    reset_lora,
)

SPEC = ModelSpec(source="tiny", quantization="none", device="cpu")
X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=X).logits


def test_ranks_share_one_base_and_keep_their_own_shapes():
    m4, _ = cache.get_peft_model(SPEC, LoraSpec(rank=4, alpha=8), seed=0)
    assert {t.shape[0] for k, t in adapter_state(m4).items() if "lora_A" in k} == {4}
    m8, _ = cache.get_peft_model(SPEC, LoraSpec(rank=8, alpha=16), seed=0)
    assert m8 is m4 and cache.cache_info().loads == 1
    assert {t.shape[0] for k, t in adapter_state(m8).items() if "lora_A" in k} == {8}
    # same seed: the rank-4 A is the first four rows of the rank-8 A (zero-padding agrees)
    again, _ = cache.get_peft_model(SPEC, LoraSpec(rank=4, alpha=8), seed=0)
    a4 = {k: v for k, v in adapter_state(again).items() if "lora_A" in k}
    a8 = {k: v for k, v in adapter_state(m8).items() if "lora_A" in k}
    for key in a4:
        assert torch.equal(a4[key], a8[key][:4])


def _global_state(model, rank, seed=5):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in adapter_state(model).items():
        shape = (rank, value.shape[1]) if "lora_A" in key else (value.shape[0], rank)
        state[key] = torch.randn(shape, generator=gen) * 0.2
    return state


def test_frozen_global_adds_exactly_b_at_a_and_never_trains():
    lora = LoraSpec(rank=4, alpha=8, dropout=0.0)
    model, _ = cache.get_peft_model(SPEC, lora, seed=0)
    reset_lora(model, 0)  # B = 0: the local adapter adds nothing
    with model.disable_adapter():
        bare = _logits(model)
    state = _global_state(model, rank=6)
    load_frozen_global(model, state, lora)
    activate(model, adapter_name(lora), with_global=True)
    with_global = _logits(model)
    assert not torch.allclose(with_global, bare)
    # reference: the same update merged densely into a plain copy of the weights
    ref, _ = cache.get_peft_model(ModelSpec(source="tiny", device="cpu", dtype="float32"),
                                  lora, seed=1)
    assert ref is not model  # another key, another base
    with ref.disable_adapter():
        base_modules = dict(ref.base_model.model.named_modules())
        for key, a in state.items():
            if "lora_A" not in key:
                continue
            b = state[key.replace("lora_A", "lora_B")]
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            base_modules[name].base_layer.weight.data += b @ a
        merged = _logits(ref)
    torch.testing.assert_close(with_global, merged, rtol=1e-4, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(f".{GLOBAL_ADAPTER}." in n for n in trainable)


def test_global_adapter_with_mixed_module_ranks_is_zero_padded():
    lora = LoraSpec(rank=4, alpha=8, dropout=0.0)
    model, _ = cache.get_peft_model(SPEC, lora, seed=0)
    state = _global_state(model, rank=6)
    v_keys = [k for k in state if "v_proj" in k]
    for key in v_keys:  # v modules at rank 3
        state[key] = state[key][:3] if "lora_A" in key else state[key][:, :3]
    load_frozen_global(model, state, lora)
    activate(model, adapter_name(lora), with_global=True)
    assert model.peft_config[GLOBAL_ADAPTER].r == 6


def test_freeze_a_leaves_only_b_trainable():
    lora = LoraSpec(rank=4, alpha=8)
    model, _ = cache.get_peft_model(SPEC, lora, seed=0)
    activate(model, adapter_name(lora), freeze_A=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)
    activate(model, adapter_name(lora))
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
