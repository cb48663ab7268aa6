from __future__ import annotations

import mmap

import pytest
import torch

from fedtune.model import current_rss_mb, peak_memory_mb, pick_device


def test_pick_device_cpu_and_auto() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device().type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pick_device_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")


def test_pick_device_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="tpu"):
        pick_device("tpu")


def test_cpu_memory_readings_track_allocations() -> None:
    size = 64 * 2**20
    before = current_rss_mb()
    # A fresh anonymous mapping: malloc could reuse pages freed by earlier tests instead.
    with mmap.mmap(-1, size) as block:
        block.write(b"\x01" * size)  # touch every page so it becomes resident
        after = current_rss_mb()
        assert after - before > 50
        assert peak_memory_mb("cpu") >= after * 0.99  # peak RSS is never below current RSS
    assert peak_memory_mb(torch.device("cpu")) == pytest.approx(peak_memory_mb("cpu"), rel=0.01)
