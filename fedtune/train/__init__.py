"""Local training and evaluation of a causal LM on packed token blocks."""

from __future__ import annotations

from fedtune.config import SCHEDULES, TrainConfig
from fedtune.train.evaluate import EvalResult, combine, evaluate
from fedtune.train.local import TrainResult, lr_at, train_local

__all__ = [
    "SCHEDULES",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "combine",
    "evaluate",
    "lr_at",
    "train_local",
]
