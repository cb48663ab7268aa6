"""A real multi-node Ray cluster on this machine, for tests and benchmarks.

Each node is one ``ray start`` (the head with ``--head``, workers with ``--address``), in a
session of its own (so its daemons and workers share one process group) and with its own
``--temp-dir`` (Ray accepts one per node, also on one machine). Every port is chosen
free, so clusters of other test runs on the machine are never joined or disturbed, and
nothing is written to Ray's default ``/tmp/ray``: a plain ``ray.init()`` elsewhere never
finds this cluster. Stopping kills exactly the process groups this harness started
(never ``ray stop``, which stops every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedtune.deploy.server import free_port

RAY = str(Path(sys.executable).with_name("ray"))




@dataclass
class RayNode:
    """One ``ray start``: its process group (= the start command's pid) and temp dir."""

    name: str
    pgid: int
    temp_dir: Path
    cpus: int

    def processes(self) -> list[psutil.Process]:
        """This node's live processes (raylet, agents, workers; the GCS on the head)."""
        found = []
        for proc in psutil.process_iter():
            # a process may end between the listing and the look (os.getpgid raises
            # ProcessLookupError, not a psutil error)
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(proc.pid) == self.pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    def running(self, title: str) -> bool:
        """Whether one of this node's workers runs a task titled ``title`` (Ray names a
        worker process ``ray::Class.method`` while it executes that method)."""
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                if " ".join(proc.cmdline()).startswith(title):
                    return True
        return False

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of this node's processes, MB: Ray's own daemons, and the
        workers that run clients."""
        out = {"ray": 0.0, "workers": 0.0}
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                rss = proc.memory_info().rss / 2**20
                worker = " ".join(proc.cmdline()).startswith("ray::ClientAppActor")
                out["workers" if worker else "ray"] += rss
        return out

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)


@dataclass
class LocalRayCluster:
    """A head and any number of worker nodes, all on this machine."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ftray-",
                                                                     dir="/tmp")))
    nodes: list[RayNode] = field(default_factory=list)
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, cpus: int, args: list[str]) -> RayNode:
        temp_dir = self.root / name  # short: Ray's socket paths must stay under 108 bytes
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen(
            [RAY, "start", *args, f"--num-cpus={cpus}", "--num-gpus=0",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env)
        node = RayNode(name, proc.pid, temp_dir, cpus)  # its session: pgid = its pid
        self.nodes.append(node)  # before waiting: stop() finds it whatever happens next
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            node.kill()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{out}")
        return node

    def start_head(self, cpus: int = 1) -> RayNode:
        self.port = free_port()
        return self._start("head", cpus, [
            "--head", f"--port={self.port}", "--include-dashboard=false",
            f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"])

    def add_worker(self, cpus: int = 1) -> RayNode:
        return self._start(f"w{len(self.nodes)}", cpus, [f"--address={self.address}"])

    def stop(self) -> None:
        """Stop every node this cluster started (workers first), then delete its temp
        dirs; raises if one of its processes survives."""
        for node in reversed(self.nodes):
            node.kill(signal.SIGTERM)
        deadline = time.monotonic() + 3  # Ray's GCS and raylets ignore SIGTERM
        while any(n.processes() for n in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
        for node in self.nodes:
            node.kill(signal.SIGKILL)
        time.sleep(0.5)
        left = [p.pid for n in self.nodes for p in n.processes()]
        shutil.rmtree(self.root, ignore_errors=True)
        if left:
            raise RuntimeError(f"Ray processes {left} survived SIGKILL")
