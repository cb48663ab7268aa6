"""Local training and evaluation of a causal LM on packed token blocks.

``session`` is one client's whole training session (prepare, train or DP-SGD, prune,
privatise, compress), run by the ClientApp, compare's baselines and the SDK. Import it
as ``fedtune.train.session``: it loads peft and Opacus, which the training loop and the
evaluation below do not need."""

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
