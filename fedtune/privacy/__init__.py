"""Differential privacy: clipping, noise and accounting (Opacus' accountants).

Pure torch and Opacus; no Flower. ``mechanism`` releases a noised client-level aggregate,
``accountant`` says what it cost, ``wrapper`` puts both around any aggregator (budget,
noise seed, checkpoint state); DP-SGD training lives in ``fedtune.train.dpsgd``.
"""

from fedtune.privacy.accountant import (
    BudgetError,
    PrivacyAccountant,
    epsilon_after,
    noise_multiplier_for,
)
from fedtune.privacy.noise import GaussianNoise

__all__ = [
    "BudgetError",
    "GaussianNoise",
    "PrivacyAccountant",
    "epsilon_after",
    "noise_multiplier_for",
]
