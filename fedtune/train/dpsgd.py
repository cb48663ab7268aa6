"""Sample-level DP-SGD on a client, with Opacus' per-sample gradients and DP optimizer.

Each step draws a Poisson batch (every training sequence joins with probability
q = batch_size / n, which is what the accountant's subsampling analysis assumes), clips
every sequence's gradient of the trainable LoRA parameters to C, sums, adds
N(0, (z C)^2) and divides by the expected batch size. Only LoRA parameters train, so only
their per-sample gradients are materialised. The hooks are removed afterwards: the model
is cached and serves later rounds without them.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from fedtune.config import TrainConfig
from fedtune.train.local import TrainResult, check_blocks, lr_at, resolve_device


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


def _noise_only_step(params: list[nn.Parameter], dp: SampleLevelDP, expected: int,
                     generator: torch.Generator | None) -> None:
    """An empty Poisson batch still releases noise: grad = N(0, (z C)^2) / expected."""
    for p in params:
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        p.grad = (noise * dp.noise_multiplier * dp.clip_norm / expected).to(p.device, p.dtype)


def train_local_dpsgd(model: nn.Module, sequences: torch.Tensor, cfg: TrainConfig,
                      dp: SampleLevelDP, seed: int = 0, device: str | torch.device | None = None,
                      secure: bool = False) -> TrainResult:
    """``cfg.steps`` DP-SGD steps (AdamW on the privatised gradient) on full packed blocks.

    ``secure`` draws the optimizer's noise from OS entropy instead of a seeded generator.
    """
    check_blocks(sequences, None)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True to train")
    dev = resolve_device(model, device)
    n = sequences.shape[0]
    expected = cfg.batch_size * cfg.grad_accum
    rate = sample_rate(expected, n)
    batches = torch.Generator().manual_seed(seed)
    noise_gen = None if secure else torch.Generator(device=dev).manual_seed(seed + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure_mode and the generator
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(torch.optim.AdamW(params, lr=cfg.lr,
                                                  weight_decay=cfg.weight_decay),
                                noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                                expected_batch_size=expected, loss_reduction="mean",
                                generator=noise_gen, secure_mode=secure)
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
                rows = (torch.rand(n, generator=batches) < rate).nonzero().squeeze(1)
                if rows.numel() == 0:
                    _noise_only_step(params, dp, expected, noise_gen)
                    optimizer.original_optimizer.step()
                    continue
                ids = sequences[rows].to(dev)
                loss = wrapped(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                tokens += int(ids.numel() - ids.shape[0])
    finally:
        optimizer.zero_grad(set_to_none=True)
        wrapped._close()  # removes the hooks and the grad_sample attributes
        quiet.__exit__(None, None, None)
        model.eval()
    return TrainResult(loss=sum(losses) / max(1, len(losses)), steps=cfg.steps,
                       examples=cfg.steps * expected, tokens=tokens,
                       seconds=time.perf_counter() - start)
