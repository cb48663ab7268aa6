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
def hetero_comparison(request, tmp_path_factory):
    """One ``fedtune compare`` of every aggregator and both baselines on the tiny hetero
    scenario (tests.support.hetero), for the whole session: test_compare.py checks the
    comparison, tests/flower/test_hetero.py each aggregator's run in it. A session that
    selected only some of test_hetero's aggregators (``-k flora``) runs only those."""
    from tests.support.hetero import run_hetero_comparison

    wanted = _aggregators_wanted(request.session.items)
    return run_hetero_comparison(tmp_path_factory.mktemp("hetero-compare"), wanted)


def _aggregators_wanted(items) -> list[str] | None:
    """The aggregators the selected tests read from the hetero comparison (None: the
    whole comparison, as test_compare.py checks it)."""
    wanted = set()
    for item in items:
        if "hetero_comparison" not in getattr(item, "fixturenames", ()):
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "aggregator" in params:
            wanted.add(params["aggregator"])
        elif "aggregators" in params:  # a test that reads several runs of the comparison
            wanted.update(params["aggregators"])
        else:
            return None
    return sorted(wanted)


@pytest.fixture
def in_process():
    """``fedtune.runs.simulate.simulate`` on the in-process Grid for one test (see
    tests.support.engine)."""
    from tests.support.engine import engine_in_process

    with engine_in_process():
        yield
