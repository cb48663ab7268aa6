"""Device selection and memory readings.

Memory is reported per device kind because the numbers mean different things: on CUDA
the allocator's peak is what limits a client, on CPU only the process's resident set is
observable (bitsandbytes shrinks tensors there, not RSS).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from fedtune.config import DEVICE_CHOICES, is_valid_device


def pick_device(preference: str = "auto") -> torch.device:
    """Resolve a device preference; asking for CUDA without CUDA fails loudly, not silently."""
    if not is_valid_device(preference):
        raise ValueError(
            f"device must be one of {', '.join(DEVICE_CHOICES)} or 'cuda:<index>', "
            f"got {preference!r}"
        )
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {preference!r} was requested but CUDA is not available "
            f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda or 'no'}); "
            "use device='cpu' or 'auto'"
        )
    device = torch.device(preference)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(
            f"device {preference!r} was requested but only "
            f"{torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return device


def _maxrss_mb() -> float:
    """Peak RSS of this process; ru_maxrss is KiB on Linux but bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory in MiB: CUDA allocator peak on GPU, process peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _maxrss_mb()


def current_rss_mb() -> float:
    """Current resident set size in MiB (falls back to the peak where /proc is missing)."""
    status = Path("/proc/self/status")
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _maxrss_mb()
