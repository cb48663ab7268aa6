"""One client's local training: a fixed number of optimizer steps on packed token blocks.

Randomness (batch order, dropout) comes from ``seed`` alone so a federated round is
reproducible: batch order uses an explicit ``torch.Generator`` and the global RNG is
forked and seeded for the duration, leaving the caller's RNG state untouched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fedtune.config import TrainConfig
from fedtune.data.tokenize import IGNORE_INDEX


@dataclass
class TrainResult:
    """What a local run did; loss is the mean training loss over its optimizer steps."""

    loss: float
    steps: int
    examples: int  # sequences consumed (steps * grad_accum * batch_size)
    tokens: int  # label tokens consumed (padding excluded)
    seconds: float


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule.

    Warmup reaches the full rate at step ``warmup_steps``; decay ends just above zero at
    the last step so no step is wasted at lr 0.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of row indices: seeded permutations, one epoch after another."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The given device, else the device of the model's first parameter."""
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _rng_devices(device: torch.device) -> list[int]:
    """CUDA devices whose RNG must be forked so dropout is seeded there too."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def check_blocks(sequences: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Reject empty or non-2D id tensors and labels of another shape."""
    if sequences.dim() != 2 or sequences.shape[0] == 0:
        shape = tuple(sequences.shape)
        raise ValueError(f"need a non-empty [n, seq_len] tensor of token ids, got shape {shape}")
    if labels is not None and labels.shape != sequences.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != ids {tuple(sequences.shape)}")


def packed_inputs(ids: torch.Tensor, positions: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The forward's inputs. With position ids (examples packed whole) there is no
    attention mask and no cache: transformers then reads the restarts of the position
    ids as example boundaries and attends block-diagonally (``find_packed_sequence_indices``
    in ``transformers.masking_utils``); a cache would turn that detection off."""
    if positions is None:
        return {"input_ids": ids}
    return {"input_ids": ids, "position_ids": positions.to(ids.device), "use_cache": False}


def _micro_step(
    model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, scale: float,
    positions: torch.Tensor | None = None,
) -> tuple[float, int]:
    """Forward + backward on one micro-batch; returns its loss and label-token count."""
    loss = model(**packed_inputs(ids, positions), labels=labels).loss
    (loss * scale).backward()
    return float(loss.detach()), int((labels != IGNORE_INDEX).sum())


def train_local(
    model: nn.Module,
    sequences: torch.Tensor,
    cfg: TrainConfig,
    seed: int = 0,
    device: str | torch.device | None = None,
    labels: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
    position_ids: torch.Tensor | None = None,
) -> TrainResult:
    """Run ``cfg.steps`` AdamW steps on the model's trainable parameters.

    ``labels`` defaults to ``sequences`` (packed blocks, no padding); pass
    ``PackedData.labels`` when blocks are padded or masked, and its ``position_ids``
    when examples are packed whole. The model should already be on
    ``device`` (default: where its parameters are); it is left in eval mode.
    ``on_step(steps done, loss)`` runs after every step: progress for an application,
    and the place to stop early (an exception it raises ends training).
    """
    check_blocks(sequences, labels)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True to train")
    dev = resolve_device(model, device)
    labels = sequences if labels is None else labels
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = batch_indices(sequences.shape[0], cfg.batch_size, torch.Generator().manual_seed(seed))
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    model.train()
    try:
        with torch.random.fork_rng(devices=_rng_devices(dev)):
            torch.manual_seed(seed)
            for step in range(cfg.steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg)
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for _ in range(cfg.grad_accum):
                    rows = next(batches)
                    ids, lab = sequences[rows].to(dev), labels[rows].to(dev)
                    positions = None if position_ids is None else position_ids[rows]
                    loss, count = _micro_step(model, ids, lab, 1.0 / cfg.grad_accum, positions)
                    step_loss += loss / cfg.grad_accum
                    tokens += count
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                losses.append(step_loss)
                if on_step is not None:
                    on_step(step + 1, step_loss)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return TrainResult(
        loss=sum(losses) / len(losses),
        steps=cfg.steps,
        examples=cfg.steps * cfg.grad_accum * cfg.batch_size,
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )
