"""Sample-level DP-SGD on a client, with Opacus' per-sample gradients and DP optimizer.

Each step draws a Poisson batch (every training sequence joins with probability
q = batch_size / n, which is what the accountant's subsampling analysis assumes), clips
every sequence's gradient of the trainable LoRA parameters to C, sums, adds
N(0, (z C)^2) and divides by the expected batch size (a constant: dividing by the drawn
size would make the step depend on who joined). Only LoRA parameters train, so only
their per-sample gradients are materialised. The hooks are removed afterwards: the model
is cached and serves later rounds without them.

A sequence's gradient is that of its own loss, the mean over its own labelled tokens
(``per_sequence_loss``), and the batch's loss is the sum of those (Opacus'
``loss_reduction="sum"``). Transformers' causal-LM loss averages over every labelled
token of the batch instead, which ties each row's gradient to the other rows' token
counts: with chat or padded blocks one added sequence then rescaled every other row and
moved the clipped sum by several C. With the sum, adding or removing a sequence adds or
removes one clipped gradient, of norm at most C, whatever the other rows hold.

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
import torch.nn.functional as F
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

    class SummedLossDPOptimizer(DPOptimizer):
        """For a loss summed over the batch (``loss_reduction="sum"``, where Opacus would
        not divide at all): the noised sum divided by the fixed expected batch size."""

        def scale_grad(self) -> None:
            for p in self.params:
                p.grad /= self.expected_batch_size * self.accumulated_iterations

    if reproducible:
        return SummedLossDPOptimizer

    class OsEntropyDPOptimizer(SummedLossDPOptimizer):
        def add_noise(self) -> None:
            source = GaussianNoise(None)
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = source.sample(p.summed_grad.shape, std)
                p.grad = (p.summed_grad + noise.to(p.summed_grad)).view_as(p)
                _mark_as_processed(p.summed_grad)
    return OsEntropyDPOptimizer


def per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's next-token loss averaged over its own labelled tokens, ``[batch]``; 0 for
    a row with none. ``labels`` are aligned with the ids (position t + 1 is the target of
    logits t), as for transformers' ``labels=``. Memory as transformers' loss: one fp32
    log-softmax of the ``[batch, seq_len, vocab]`` logits (an upcast copy only where they
    are not fp32), kept for the backward; the mean needs no more than per-token losses."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    token_losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="none")
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return token_losses.view_as(targets).sum(dim=1) / counts.clamp(min=1)


def _backward_per_sequence(wrapped: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                           positions: torch.Tensor | None) -> torch.Tensor:
    """Forward and backward of the summed per-sequence loss, which leaves each row's own
    gradient in Opacus' per-sample gradients; returns the rows' losses."""
    logits = wrapped(**packed_inputs(ids, positions)).logits
    losses = per_sequence_loss(logits, labels)
    del logits
    losses.sum().backward()
    return losses.detach()


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
    is the mean over its own labelled tokens (a block with none adds nothing). The
    reported loss is the mean over steps of the batch's mean per-sequence loss.
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
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        optimizer = optimizer_class(torch.optim.AdamW(params, lr=cfg.lr,
                                                      weight_decay=cfg.weight_decay),
                                    noise_multiplier=dp.noise_multiplier,
                                    max_grad_norm=dp.clip_norm, expected_batch_size=expected,
                                    loss_reduction="sum", generator=noise_gen)
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
                sequence_losses = _backward_per_sequence(wrapped, ids, targets, positions)
                optimizer.step()
                losses.append(float(sequence_losses.mean()))
                tokens += int((targets[:, 1:] != IGNORE_INDEX).sum())
    finally:
        optimizer.zero_grad(set_to_none=True)
        wrapped._close()  # removes the hooks and the grad_sample attributes
        quiet.__exit__(None, None, None)
        model.eval()
    return TrainResult(loss=sum(losses) / max(1, len(losses)), steps=cfg.steps,
                       examples=cfg.steps * expected, tokens=tokens,
                       seconds=time.perf_counter() - start)
