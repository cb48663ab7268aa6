"""``fedtune.Server``: a ``fedtune server`` process started and watched from Python.

For an application's own tests and demos (a federation on one machine), and for
services that start the server themselves. It is the real deployment server, in its
own process: the same SuperLink, checkpoints and run directory as the command.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedtune.sdk.client import FederationError


class Server:
    """``config``: the server's scenario (path or bundled name); ``overrides``:
    ``section.key=value`` strings as for ``--set``; ``address``: HOST:PORT to listen on
    (port 0 picks a free one; default: the scenario's); ``out``: parent folder of the run
    directory."""

    def __init__(self, config: str | Path, overrides: list[str] | tuple[str, ...] = (),
                 *, insecure: bool = False, address: str | None = None,
                 out: str | Path | None = None) -> None:
        from fedtune.config import load_scenario

        sets = list(overrides)
        if address is not None:
            host, _, port = address.rpartition(":")
            if port == "0":
                from fedtune.deploy.client import free_port

                address = f"{host}:{free_port()}"
            sets.append(f"server.address={address!r}")
        scenario = load_scenario(str(config), sets)  # ConfigError now, not in the process
        self.address: str = scenario.server.address
        self.scenario = scenario
        self._args = [sys.executable, "-m", "fedtune.cli", "server", "--config", str(config)]
        for text in sets:
            self._args += ["--set", text]
        if insecure:
            self._args.append("--insecure")
        if out is not None:
            self._args += ["--out", str(out)]
        self.log = Path(tempfile.mkstemp(prefix="fedtune-server-", suffix=".log")[1])
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> Server:
        """Start the process and return once it accepts clients (its run directory is
        then known); raises FederationError with its log when it fails to."""
        with open(self.log, "wb") as handle:
            self._process = subprocess.Popen(self._args, stdout=handle, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        deadline = time.monotonic() + timeout
        while self._announced() is None:
            if self._process.poll() is not None:
                raise FederationError(f"the server exited with code {self._process.returncode}:"
                                      f"\n{self.output()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise FederationError(f"the server did not start within {timeout:g} s:\n"
                                      f"{self.output()[-2000:]}")
            time.sleep(0.2)
        return self

    def _announced(self) -> Path | None:
        found = re.search(r"run directory (\S+)", self.output())
        return Path(found.group(1).rstrip(";")) if found else None

    @property
    def run_dir(self) -> Path | None:
        """Where the run is recorded (``summary.json``, ``adapter/``), once started."""
        return self._announced()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float | None = None) -> Path:
        """Wait for the run to end; its run directory, or FederationError with the log
        when it did not complete."""
        assert self._process is not None, "start() the server first"
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the server is still running after {timeout} s") from None
        if code != 0 or self.run_dir is None:
            raise FederationError(f"the server ended with code {code}:\n{self.output()[-2000:]}")
        return self.run_dir

    def stop(self) -> None:
        """Stop the server and its Flower processes (a later ``fedtune server --resume``
        continues the run from its last checkpoint)."""
        if self._process is None or self._process.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self._process.pid, sig)
                self._process.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
