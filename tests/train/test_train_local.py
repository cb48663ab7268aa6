"""Local training: learning, reproducibility, batching, schedules and validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fedtune.train import TrainConfig, evaluate, lr_at, train_local


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder(nn.Module):
    """Wraps a model and remembers the first token of every row it is trained on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[list[int]] = []

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        self.calls.append(input_ids[:, 0].tolist())
        return self.inner(input_ids=input_ids, labels=labels)


def test_training_lowers_loss_on_repeated_text(model, verse_blocks) -> None:
    blocks = verse_blocks
    before = evaluate(model, blocks, batch_size=4, device="cpu")
    cfg = TrainConfig(steps=40, batch_size=4, lr=3e-3)
    result = train_local(model, blocks, cfg, seed=0, device="cpu")
    after = evaluate(model, blocks, batch_size=4, device="cpu")
    assert after.loss < before.loss - 1.0
    assert math.isfinite(result.loss) and result.loss < before.loss
    assert result.steps == 40 and result.examples == 160 and result.tokens == 160 * 32
    assert result.seconds > 0
    assert not model.training


def test_same_seed_same_weights_other_seed_differs(make_model, random_blocks) -> None:
    base = make_model(dropout=0.2)  # dropout: model-side randomness must be seeded too
    cfg = TrainConfig(steps=5, batch_size=3, lr=1e-3)
    runs = {}
    for name, seed, global_seed in [("a", 1, 100), ("b", 1, 200), ("c", 2, 100)]:
        model = copy.deepcopy(base)
        torch.manual_seed(global_seed)  # the caller's RNG state must not matter
        train_local(model, random_blocks, cfg, seed=seed, device="cpu")
        runs[name] = weights(model)
    assert same_weights(runs["a"], runs["b"])
    assert not same_weights(runs["a"], runs["c"])


def test_callers_rng_state_is_left_alone(model, random_blocks) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_local(model, random_blocks, TrainConfig(steps=2, batch_size=2), seed=9, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_grad_accum_consumes_batch_times_accum_rows_per_step(model, random_blocks) -> None:
    recorder = Recorder(model)
    cfg = TrainConfig(steps=3, batch_size=2, grad_accum=2)
    result = train_local(recorder, random_blocks[:6], cfg, seed=0, device="cpu")
    assert result.examples == 12 and result.tokens == 12 * 16
    assert [len(rows) for rows in recorder.calls] == [2] * 6  # 3 steps x 2 micro-batches
    seen = [row for rows in recorder.calls for row in rows]
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:]) == list(range(6))  # 2 epochs


def test_optimizer_steps_once_per_accumulated_step(model, random_blocks) -> None:
    calls = []
    original = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = counting_step
    try:
        train_local(model, random_blocks, TrainConfig(steps=3, grad_accum=4), seed=0, device="cpu")
    finally:
        torch.optim.AdamW.step = original
    assert len(calls) == 3


def test_only_trainable_parameters_change(model, random_blocks) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("lm_head")
    before = weights(model)
    cfg = TrainConfig(steps=3, lr=1e-2, weight_decay=0.1)
    train_local(model, random_blocks, cfg, seed=0, device="cpu")
    after = weights(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"lm_head.weight"}


def test_padding_labels_are_not_trained_on(model, random_blocks) -> None:
    labels = random_blocks.clone()
    labels[:, 8:] = -100
    result = train_local(model, random_blocks, TrainConfig(steps=2), seed=0, labels=labels)
    assert result.tokens == 2 * 4 * 8


def test_empty_input_and_frozen_model_rejected(model, random_blocks) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        train_local(model, random_blocks[:0], TrainConfig(), seed=0, device="cpu")
    for param in model.parameters():
        param.requires_grad = False
    with pytest.raises(ValueError, match="requires_grad"):
        train_local(model, random_blocks, TrainConfig(), seed=0, device="cpu")


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("batch_size", -1), ("grad_accum", 1.5), ("lr", 0.0), ("schedule", "step"),
     ("warmup_steps", -1), ("weight_decay", -0.1), ("max_grad_norm", 0.0)],
)
def test_config_validation_names_field_value_and_allowed(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} = .*allowed"):
        TrainConfig(**{field: value})


def test_lr_schedules() -> None:
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=4, schedule="linear")
    warm = [lr_at(s, cfg) for s in range(4)]
    assert warm == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_at(4, cfg) == pytest.approx(1.0)
    decay = [lr_at(s, cfg) for s in range(4, 10)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False)) and decay[-1] > 0
    cosine = TrainConfig(steps=10, lr=1.0, schedule="cosine")
    assert lr_at(0, cosine) == pytest.approx(1.0)
    assert lr_at(5, cosine) == pytest.approx(0.5)
    assert 0 < lr_at(9, cosine) < 0.05
    constant = TrainConfig(steps=10, lr=0.5)
    assert {lr_at(s, constant) for s in range(10)} == {0.5}
