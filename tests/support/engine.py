"""Runs that would start Flower's simulation engine, on the in-process Grid instead.

The engine itself is under test in tests/flower/test_simulation.py, test_scale.py,
test_ray_cluster.py and test_flwr_run.py; everything else that only needs a federation
to have run (the comparison, the CLI's simulate command) gets it from
``fedtune.flower.inprocess_grid.simulate_in_process``: same checks, same run directory,
same ``SimulationError``, no Ray start and no model load per worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from fedtune.flower.inprocess_grid import simulate_in_process


@contextlib.contextmanager
def engine_in_process() -> Iterator[None]:
    """While open, ``fedtune.runs.simulate.simulate`` (which ``fedtune compare`` and the
    CLI import when they run) is ``simulate_in_process``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fedtune.runs.simulate.simulate", simulate_in_process)
        yield
