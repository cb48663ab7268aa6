"""Suite-wide settings and the fixtures several modules share."""

import os

import pytest
import torch

# Tiny models on a 2-core machine: one torch thread is ~100x faster than two fighting
# over the cores (measured on tiny-Llama forward/backward).
torch.set_num_threads(1)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(scope="session")
def hetero_comparison(tmp_path_factory):
    """One ``fedtune compare`` of every aggregator and both baselines on the tiny hetero
    scenario (tests.support.hetero), for the whole session: test_compare.py checks the
    comparison, tests/flower/test_hetero.py each aggregator's run in it."""
    from tests.support.hetero import run_comparison_of_every_aggregator

    return run_comparison_of_every_aggregator(tmp_path_factory.mktemp("hetero-compare"))


@pytest.fixture
def in_process():
    """``fedtune.runs.simulate.simulate`` on the in-process Grid for one test (see
    tests.support.engine)."""
    from tests.support.engine import engine_in_process

    with engine_in_process():
        yield
