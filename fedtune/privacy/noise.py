"""Gaussian noise from an explicit source: seeded (reproducible) or OS entropy (production).

A seeded source is a ``torch.Generator`` with a known seed, so a seeded run adds the same
noise every time and a resumed run can redraw it. That is for experiments only: anyone who
knows the seed can subtract the noise. The secure source draws every sample from
``os.urandom`` (the operating system's cryptographic generator) through the Box-Muller
transform in float64, and is what a deployment that promises privacy must use.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

_TWO_POW_53 = float(2**53)


def _urandom_uniform(count: int) -> np.ndarray:
    """``count`` uniforms in (0, 1] from the OS generator, 53 random bits each."""
    raw = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(11)
    return (raw.astype(np.float64) + 1.0) / _TWO_POW_53


def os_uniform(count: int) -> Tensor:
    """``count`` float64 uniforms in (0, 1] from the OS generator: random choices a DP
    guarantee rests on (DP-SGD's Poisson batches) that nobody may redo from a seed."""
    return torch.from_numpy(_urandom_uniform(count))


def _urandom_normal(count: int) -> np.ndarray:
    """Standard normals by Box-Muller from OS-entropy uniforms."""
    pairs = (count + 1) // 2
    u1, u2 = _urandom_uniform(pairs), _urandom_uniform(pairs)
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


class GaussianNoise:
    """Draws N(0, std^2) tensors; ``seed=None`` means OS entropy (not reproducible)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)

    @property
    def secure(self) -> bool:
        return self._generator is None

    def sample(self, shape: tuple[int, ...] | torch.Size, std: float,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """A CPU tensor of independent N(0, std^2) entries (zeros when std is 0)."""
        if std < 0 or not math.isfinite(std):
            raise ValueError(f"noise standard deviation must be finite and >= 0, got {std}")
        if std == 0:
            return torch.zeros(shape, dtype=dtype)
        if self._generator is not None:
            z = torch.randn(shape, generator=self._generator, dtype=torch.float64)
        else:
            count = math.prod(shape)
            z = torch.from_numpy(_urandom_normal(count)).reshape(shape)
        return (z * std).to(dtype)
