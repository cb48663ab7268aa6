"""DP-SGD through Opacus on a tiny peft model: trains, draws its batches and noise from OS
entropy unless asked for a reproducible run, clips every example's gradient (one
outlier cannot move the update further than the clip norm allows), leaves no hooks."""

import pytest
import torch

from fedtune.config import LoraSpec, ModelSpec, TrainConfig
from fedtune.model.cache import get_peft_model
from fedtune.model.lora import adapter_state, reset_lora
from fedtune.train.dpsgd import SampleLevelDP, _poisson_rows, train_local_dpsgd

CFG = TrainConfig(steps=4, batch_size=6, lr=1e-2)


@pytest.fixture(scope="module")
def model():
    m, _ = get_peft_model(ModelSpec(source="tiny", quantization="none", device="cpu"),
                          LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")), 0)
    return m


def _run(model, seed: int, dp: SampleLevelDP, reproducible: bool = True
         ) -> dict[str, torch.Tensor]:
    reset_lora(model, 0)
    data = torch.randint(0, 250, (40, 24), generator=torch.Generator().manual_seed(1))
    train_local_dpsgd(model, data, CFG, dp, seed=seed, reproducible=reproducible)
    return adapter_state(model)


def test_a_reproducible_run_is_seeded_and_moves_the_lora(model):
    dp = SampleLevelDP(clip_norm=0.5, noise_multiplier=1.0)
    reset_lora(model, 0)
    start = adapter_state(model)
    first, again, other = _run(model, 3, dp), _run(model, 3, dp), _run(model, 4, dp)
    assert any(not torch.equal(first[k], start[k]) for k in first)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_by_default_the_same_seed_gives_another_run(model):
    """Batches and noise from OS entropy: whoever knows the seed cannot redo them."""
    dp = SampleLevelDP(clip_norm=0.5, noise_multiplier=1.0)
    first, again = _run(model, 3, dp, False), _run(model, 3, dp, False)
    assert any(not torch.equal(first[k], again[k]) for k in first)


def test_poisson_batches_come_from_os_entropy_unless_seeded():
    secure = [_poisson_rows(1000, 0.5, None) for _ in range(2)]
    seeded = [_poisson_rows(1000, 0.5, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert not torch.equal(*secure)
    assert torch.equal(*seeded)
    assert 400 < secure[0].numel() < 600  # each row joins with probability 0.5


def test_dpsgd_leaves_the_cached_model_clean(model):
    _run(model, 0, SampleLevelDP(clip_norm=1.0, noise_multiplier=0.5))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps the gradient it was handed: DP-SGD's privatised gradient."""

    handed: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.handed.append([p.grad.detach().clone() for g in self.param_groups
                            for p in g["params"]])
        return super().step(closure)


def _privatised_gradient(model, data, dp, monkeypatch) -> torch.Tensor:
    """The first step's gradient as DP-SGD hands it to AdamW (every row in the batch)."""
    monkeypatch.setattr(torch.optim, "AdamW", _RecordingAdamW)
    _RecordingAdamW.handed = []
    reset_lora(model, 0)
    one_step = TrainConfig(steps=1, batch_size=data.shape[0], lr=1e-2)
    train_local_dpsgd(model, data, one_step, dp, seed=5)
    return torch.cat([g.flatten() for g in _RecordingAdamW.handed[0]])


def _example_gradient(model, sequence) -> torch.Tensor:
    """One example's unclipped gradient, by plain autograd (independent of Opacus)."""
    reset_lora(model, 0)
    model.train()
    ids = sequence.unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    model.eval()
    return grad


def test_one_outlier_moves_the_gradient_by_at_most_the_clip_norm(model, monkeypatch):
    """Replace one example of a 4-example batch by an outlier (one token repeated): with
    almost no noise, the privatised gradient moves by at most 2 C / 4, while the two
    examples' own gradients differ by far more. Without per-sample clipping it moves by
    their difference / 4 and the bound fails."""
    data = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(1))
    outlier = data.clone()
    outlier[0] = 7
    raw_gap = float((_example_gradient(model, outlier[0])
                     - _example_gradient(model, data[0])).norm())
    clip = raw_gap / 100
    dp = SampleLevelDP(clip_norm=clip, noise_multiplier=1e-6)
    moved = float((_privatised_gradient(model, outlier, dp, monkeypatch)
                   - _privatised_gradient(model, data, dp, monkeypatch)).norm())
    assert moved <= 2 * clip / 4 * (1 + 1e-3)
    assert raw_gap / 4 > 10 * (2 * clip / 4)  # unclipped, the move would break the bound


def test_bad_dpsgd_settings():
    with pytest.raises(ValueError, match="clip norm"):
        SampleLevelDP(clip_norm=0, noise_multiplier=1)
    with pytest.raises(ValueError, match="noise multiplier"):
        SampleLevelDP(clip_norm=1, noise_multiplier=0)
