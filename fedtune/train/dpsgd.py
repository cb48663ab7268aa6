"""Sample-level DP-SGD on a client, with Opacus' per-sample gradients and DP optimizer.

Each step draws a Poisson batch (every training sequence joins with probability
q = batch_size / n, which is what the accountant's subsampling analysis assumes), clips
every sequence's gradient of the trainable LoRA parameters to C, sums, adds
N(0, (z C)^2) and divides by the expected batch size. Only LoRA parameters train, so only
their per-sample gradients are materialised. The hooks are removed afterwards: the model
is cached and serves later rounds without them.

The guarantee rests on two random choices, which sequences join each batch and the
noise, so both come from OS entropy (``fedtune.privacy.noise``) unless the caller asks
for a reproducible experiment run; then both are drawn from the seed, and whoever knows
it knows the batches and can subtract the noise. (Opacus' own ``secure_mode`` without a
generator would draw from torch's global generator, which the training seeds.)
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fedtune.config import TrainConfig
from fedtune.data.tokenize import IGNORE_INDEX
from fedtune.privacy.noise import GaussianNoise, os_uniform
from fedtune.train.local import TrainResult, check_blocks, lr_at, packed_inputs, resolve_device


@dataclass(frozen=True)
class SampleLevelDP:
    """DP-SGD settings: per-sequence clip norm C and noise multiplier z."""

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if self.clip_norm <= 0:
            raise ValueError(f"DP-SGD clip norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier <= 0:
            raise ValueError(f"DP-SGD noise multiplier must be > 0, got {self.noise_multiplier}")


def sample_rate(batch_size: int, examples: int) -> float:
    return min(1.0, batch_size / examples)


@functools.cache
def _dp_optimizer(reproducible: bool) -> type:
    """Opacus' DP optimizer, or (not ``reproducible``) one whose Gaussian noise comes from
    OS entropy. Opacus is imported here, on first use: it loads scipy.stats, about a
    second that every client process not running DP-SGD would pay for nothing."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    if reproducible:
        return DPOptimizer

    class OsEntropyDPOptimizer(DPOptimizer):
        def add_noise(self) -> None:
            source = GaussianNoise(None)
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = source.sample(p.summed_grad.shape, std)
                p.grad = (p.summed_grad + noise.to(p.summed_grad)).view_as(p)
                _mark_as_processed(p.summed_grad)
    return OsEntropyDPOptimizer


def _poisson_rows(n: int, rate: float, batches: torch.Generator | None) -> torch.Tensor:
    """The rows of one Poisson batch: each joins with probability ``rate``."""
    draws = os_uniform(n) if batches is None else torch.rand(n, generator=batches)
    return (draws < rate).nonzero().squeeze(1)


def _noise_only_step(params: list[nn.Parameter], dp: SampleLevelDP, expected: int,
                     generator: torch.Generator | None) -> None:
    """An empty Poisson batch still releases noise: grad = N(0, (z C)^2) / expected."""
    source = GaussianNoise(None) if generator is None else None
    for p in params:
        if source is not None:
            noise = source.sample(p.shape, 1.0)
        else:
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        p.grad = (noise * dp.noise_multiplier * dp.clip_norm / expected).to(p.device, p.dtype)


def train_local_dpsgd(model: nn.Module, sequences: torch.Tensor, cfg: TrainConfig,
                      dp: SampleLevelDP, seed: int = 0, device: str | torch.device | None = None,
                      reproducible: bool = False, labels: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> TrainResult:
    """``cfg.steps`` DP-SGD steps (AdamW on the privatised gradient) on full packed blocks.

    Batches and noise come from OS entropy; ``reproducible`` draws both from ``seed``
    (an experiment run: see the module's docstring). ``labels`` (default: the ids) and
    ``position_ids`` as for ``train_local``: a block's loss, and so its clipped gradient,
    counts its labelled tokens only.
    """
    check_blocks(sequences, labels)
    labels = sequences if labels is None else labels
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True to train")
    dev = resolve_device(model, device)
    n = sequences.shape[0]
    expected = cfg.batch_size * cfg.grad_accum
    rate = sample_rate(expected, n)
    batches = torch.Generator().manual_seed(seed) if reproducible else None
    noise_gen = torch.Generator(device=dev).manual_seed(seed + 1) if reproducible else None
    from opacus import GradSampleModule

    optimizer_class = _dp_optimizer(reproducible)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure_mode and the generator
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = optimizer_class(torch.optim.AdamW(params, lr=cfg.lr,
                                                      weight_decay=cfg.weight_decay),
                                    noise_multiplier=dp.noise_multiplier,
                                    max_grad_norm=dp.clip_norm, expected_batch_size=expected,
                                    loss_reduction="mean", generator=noise_gen)
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    wrapped.train()
    quiet = warnings.catch_warnings()  # backward hooks on a model whose inputs need no grad
    quiet.__enter__()
    warnings.simplefilter("ignore", UserWarning)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for step in range(cfg.steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg)
                optimizer.zero_grad(set_to_none=True)
                rows = _poisson_rows(n, rate, batches)
                if rows.numel() == 0:
                    _noise_only_step(params, dp, expected, noise_gen)
                    optimizer.original_optimizer.step()
                    continue
                ids, targets = sequences[rows].to(dev), labels[rows].to(dev)
                positions = None if position_ids is None else position_ids[rows]
                loss = wrapped(**packed_inputs(ids, positions), labels=targets).loss
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                tokens += int((targets[:, 1:] != IGNORE_INDEX).sum())
    finally:
        optimizer.zero_grad(set_to_none=True)
        wrapped._close()  # removes the hooks and the grad_sample attributes
        quiet.__exit__(None, None, None)
        model.eval()
    return TrainResult(loss=sum(losses) / max(1, len(losses)), steps=cfg.steps,
                       examples=cfg.steps * expected, tokens=tokens,
                       seconds=time.perf_counter() - start)
