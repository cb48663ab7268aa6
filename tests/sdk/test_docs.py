"""docs/sdk.md is a working program: its python blocks run, in order, in a fresh process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "sdk.md"

pytestmark = pytest.mark.timeout(600)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_page_has_a_snippet_for_each_part_of_the_api() -> None:
    code = "\n".join(python_blocks(DOC.read_text()))
    for name in ("fedtune.Server", "fedtune.Client", ".start(", ".run_async(", "on_round",
                 "load_adapter", "export_adapter", "merge=True", "train_local",
                 "fedtune.DataError"):
        assert name in code, f"docs/sdk.md runs no snippet with {name}"


@pytest.mark.e2e
def test_sdk_doc_snippets_run(tmp_path: Path) -> None:
    # no server/server.toml here: the page's Server("server/server.toml") is the bundled one
    script = tmp_path / "snippets.py"
    script.write_text("\n\n".join(python_blocks(DOC.read_text())))
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=540)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "completed after round 2" in done.stdout, done.stdout
    moved = float(re.search(r"moves the logits by (\S+)", done.stdout).group(1))
    assert moved > 0
    before, after = map(float, re.search(r"held-out loss (\S+) -> (\S+)", done.stdout).groups())
    assert after < before
    assert done.stdout.count("DataError:") == 4
    assert (tmp_path / "exported" / "merged" / "config.json").is_file()
    assert (tmp_path / "exported" / "adapter" / "adapter_config.json").is_file()
