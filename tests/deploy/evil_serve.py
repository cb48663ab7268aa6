"""``fedtune server`` run by a malicious operator: the same SuperLink and sealed run,
but its ServerApp is ``tests.flower.evil_server``'s attack instead of fedtune's. Run as
``python -m tests.deploy.evil_serve`` with ``fedtune server``'s arguments."""

from __future__ import annotations

import runpy
from pathlib import Path

from fedtune.deploy import server

_honest_app = server.write_app


def _evil_app(folder: Path, config: dict) -> Path:
    app = _honest_app(folder, config)
    project = app / "pyproject.toml"
    project.write_text(project.read_text().replace("fedtune.flower.server_app:app",
                                                   "tests.flower.evil_server:app"))
    return app


server.write_app = _evil_app

if __name__ == "__main__":
    runpy.run_module("fedtune.cli", run_name="__main__")
