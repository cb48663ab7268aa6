"""Differential privacy: clipping, noise, accounting (Opacus' accountants) and DP-SGD.

Pure torch and Opacus; no Flower. ``mechanism`` releases a noised client-level aggregate,
``dpsgd`` trains a client with per-sample clipping, ``accountant`` says what it cost.
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
