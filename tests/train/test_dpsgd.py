"""DP-SGD through Opacus on a tiny peft model: trains, is seeded, leaves no hooks behind."""

import pytest
import torch

from fedtune.config import LoraSpec, ModelSpec, TrainConfig
from fedtune.model.cache import get_peft_model
from fedtune.model.lora import adapter_state, reset_lora
from fedtune.train.dpsgd import SampleLevelDP, train_local_dpsgd

CFG = TrainConfig(steps=4, batch_size=6, lr=1e-2)


@pytest.fixture(scope="module")
def model():
    m, _ = get_peft_model(ModelSpec(source="tiny", quantization="none", device="cpu"),
                          LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")), 0)
    return m


def _run(model, seed: int, dp: SampleLevelDP) -> dict[str, torch.Tensor]:
    reset_lora(model, 0)
    data = torch.randint(0, 250, (40, 24), generator=torch.Generator().manual_seed(1))
    train_local_dpsgd(model, data, CFG, dp, seed=seed)
    return adapter_state(model)


def test_dpsgd_is_seeded_and_moves_the_lora(model):
    dp = SampleLevelDP(clip_norm=0.5, noise_multiplier=1.0)
    reset_lora(model, 0)
    start = adapter_state(model)
    first, again, other = _run(model, 3, dp), _run(model, 3, dp), _run(model, 4, dp)
    assert any(not torch.equal(first[k], start[k]) for k in first)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_dpsgd_leaves_the_cached_model_clean(model):
    _run(model, 0, SampleLevelDP(clip_norm=1.0, noise_multiplier=0.5))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def _update_after(model, data: torch.Tensor, dp: SampleLevelDP) -> dict[str, torch.Tensor]:
    reset_lora(model, 0)
    start = adapter_state(model)
    train_local_dpsgd(model, data, CFG, dp, seed=5)
    return {k: v - start[k] for k, v in adapter_state(model).items()}


def _relative_gap(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
    num = sum(float((x[k] - y[k]).pow(2).sum()) for k in x) ** 0.5
    return num / sum(float(x[k].pow(2).sum()) for k in x) ** 0.5


def test_clipped_gradients_are_drowned_by_large_noise(model):
    """Each example's gradient is clipped to C and the noise is z * C: with z huge, two
    different datasets give almost the same update (same seed, same noise); with z small
    the data decides. Without per-sample clipping the first would fail."""
    a = torch.randint(0, 250, (40, 24), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 250, (40, 24), generator=torch.Generator().manual_seed(2))
    loud = SampleLevelDP(clip_norm=1.0, noise_multiplier=1e4)
    quiet = SampleLevelDP(clip_norm=1.0, noise_multiplier=1e-3)
    drowned = _relative_gap(_update_after(model, a, loud), _update_after(model, b, loud))
    heard = _relative_gap(_update_after(model, a, quiet), _update_after(model, b, quiet))
    assert drowned < 1e-2
    assert heard > 0.1


def test_bad_dpsgd_settings():
    with pytest.raises(ValueError, match="clip norm"):
        SampleLevelDP(clip_norm=0, noise_multiplier=1)
    with pytest.raises(ValueError, match="noise multiplier"):
        SampleLevelDP(clip_norm=1, noise_multiplier=0)
