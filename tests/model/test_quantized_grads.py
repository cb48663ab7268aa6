"""LoRA on a bitsandbytes 4-bit / 8-bit base: forward and LoRA gradients equal those of an
fp32 model holding the dequantized weights (the base is frozen, only the math differs)."""

import bitsandbytes as bnb
import pytest
import torch

from fedtune.config import LoraSpec, ModelSpec
from fedtune.model.loading import load_base_model
from fedtune.model.lora import attach_lora


def _dequantized_twin(quantized):
    twin, _ = load_base_model(ModelSpec(source="tiny", quantization="none", device="cpu"))
    modules = dict(twin.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = module.weight.data.float() * module.weight.SCB.float()[:, None] / 127.0
        else:
            continue
        modules[name].weight.data.copy_(w.float())
    return twin


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_lora_gradients_through_a_quantized_base_match_dequantized_fp32(quantization):
    base, _ = load_base_model(ModelSpec(source="tiny", quantization=quantization, device="cpu"))
    twin = _dequantized_twin(base)
    spec = LoraSpec(rank=4, alpha=8, dropout=0.0)
    models = [attach_lora(base, spec, seed=1), attach_lora(twin, spec, seed=1)]
    for model in models:  # a non-zero B so that gradients reach every LoRA factor
        for name, p in model.named_parameters():
            if "lora_B" in name:
                gen = torch.Generator().manual_seed(len(name))
                p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in models:
        model.train()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-3 if quantization == "8bit" else 1e-5)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 8
    for name, ref in grads[1].items():
        got = grads[0][name]
        assert got is not None and ref.norm() > 0
        tolerance = 2e-2 if quantization == "8bit" else 1e-4
        assert float((got - ref).norm() / ref.norm()) < tolerance, name


def test_a_4bit_lora_still_trains_after_an_evaluation():
    """bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights on the first no-grad eval
    forward into a layout autograd does not see; clients evaluate then train on the same
    cached model, so fedtune switches that off (``keep_4bit_trainable``)."""
    base, _ = load_base_model(ModelSpec(source="tiny", quantization="4bit", device="cpu"))
    model = attach_lora(base, LoraSpec(rank=4, alpha=8, dropout=0.0), seed=0)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
