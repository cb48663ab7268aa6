"""Fixtures: a seeded generator and a factory of random client updates."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from lora_reference import make_update

from fedtune.core.adapters import ClientUpdate


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def updates_factory(gen: torch.Generator) -> Callable[..., list[ClientUpdate]]:
    """updates_factory(ranks, examples, scales=None, **kw) -> one update per client."""

    def build(
        ranks: Sequence[int],
        examples: Sequence[int],
        scales: Sequence[float] | None = None,
        **kw: object,
    ) -> list[ClientUpdate]:
        scales = scales or [1.0] * len(ranks)
        return [
            make_update(gen, r, n, s, client_id=f"c{i}", **kw)  # type: ignore[arg-type]
            for i, (r, n, s) in enumerate(zip(ranks, examples, scales, strict=True))
        ]

    return build
