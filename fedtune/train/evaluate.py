"""Held-out loss and perplexity, weighted per predicted token.

Weighting by tokens (not by batch) makes the result independent of batch size and lets
per-client results be combined exactly into a global number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.train.local import IGNORE_INDEX, check_blocks, packed_inputs, resolve_device


@dataclass
class EvalResult:
    """Mean next-token loss over ``tokens`` predicted tokens, and exp(loss)."""

    loss: float
    perplexity: float
    tokens: int


def perplexity_of(loss: float) -> float:
    """exp(loss), inf instead of an overflow for a diverged model."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token cross-entropy and the number of predicted tokens."""
    targets = labels[:, 1:].reshape(-1)
    predictions = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    sequences: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> EvalResult:
    """Token-weighted causal LM loss of ``model`` on ``[n, seq_len]`` blocks.

    ``labels`` defaults to ``sequences``; -100 marks positions not to score.
    ``position_ids``: examples packed whole (see ``packed_inputs``). The model's
    train/eval mode is restored afterwards.
    """
    check_blocks(sequences, labels)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = sequences if labels is None else labels
    dev = resolve_device(model, device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, sequences.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            positions = None if position_ids is None else position_ids[rows]
            logits = model(**packed_inputs(sequences[rows].to(dev), positions)).logits
            batch_total, batch_count = _summed_loss(logits, labels[rows].to(dev))
            total, count = total + batch_total, count + batch_count
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to score (every label is -100 or blocks have length 1)")
    return EvalResult(loss=total / count, perplexity=perplexity_of(total / count), tokens=count)


def combine(results: list[EvalResult]) -> EvalResult:
    """Token-weighted mean of several results, as if evaluated on their union."""
    count = sum(r.tokens for r in results)
    if count == 0:
        raise ValueError("cannot combine evaluation results with no tokens")
    loss = sum(r.loss * r.tokens for r in results) / count
    return EvalResult(loss=loss, perplexity=perplexity_of(loss), tokens=count)
