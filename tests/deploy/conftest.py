"""Fixtures the deployment modules share: real-process federations are the suite's most
expensive tests, so one that can serve two modules runs once per session."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tests.deploy import harness as h


@pytest.fixture(scope="session")
def background():
    """Federations started here run while the tests go on (each mostly waits on
    Flower's polling); a test waits on the future of the one it reads."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


@pytest.fixture(scope="session")
def honest_federation(background, tmp_path_factory) -> Future[h.HonestRun]:
    """``harness.honest_federation``, started on first request."""
    return background.submit(h.honest_federation, tmp_path_factory.mktemp("honest"))
