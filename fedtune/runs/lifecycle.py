"""Stopping a run on SIGTERM / SIGINT and continuing it: what ``fedtune simulate`` and
``fedtune server`` share.

Both stop on the first SIGTERM or SIGINT (a Ctrl-C reaches the whole process group, as
a terminal sends it), stop every process they started, leave every completed round in
the run directory (its checkpoint), say so in its summary and report, and exit with
128 + the signal's number after printing the ``--resume`` command that continues the
run. A second signal during the clean-up is only noted, so it is not cut short.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedtune.config import ConfigError, Scenario, build_scenario
from fedtune.config.scenario import apply_overrides, parse_override
from fedtune.runs.rundir import SCENARIO_FILE, SUMMARY_FILE, atomic_write_text, write_report


class Interrupted(BaseException):
    """A stop signal, raised where the main thread happens to be (BaseException: no
    ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def stop_signals(on_signal: Callable[[int], bool] | None = None) -> Iterator[list[int]]:
    """While the block runs, the first SIGTERM or SIGINT raises :class:`Interrupted`,
    unless ``on_signal(signum)`` says it has handled it (True: the stop is under way
    elsewhere, e.g. the round loop's thread); later ones are only noted. The list holds
    the first signal's number. Outside the main thread (where Python delivers signals)
    nothing changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if received:
            return
        received.append(signum)
        if on_signal is not None and on_signal(signum):
            return
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def exit_at_once(code: int) -> None:
    """End a stopped command now: everything it wrote is closed and every process it
    started is gone, and the interpreter's own teardown of torch, transformers and Ray
    takes seconds more on a loaded machine (10 s measured at a load of 16 on 2 cores)
    with nothing left to do. Only where this process is the command itself (its stdout
    the process's own, not a test runner's): there SystemExit."""
    if sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        raise SystemExit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def mark_stopped(run_dir: Path, status: str, reason: str) -> bool:
    """The summary says ``status`` (with ``reason``) once nothing runs any more, unless
    the run completed, and the report says the same; ``--resume`` rewrites both from
    the checkpoint. False when the run directory has no summary yet."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if summary.get("status") not in ("completed", status):
        summary["status"], summary["error"] = status, reason
        atomic_write_text(path, json.dumps(summary, indent=2))
        with contextlib.suppress(Exception):  # a report never hides the outcome
            write_report(run_dir, summary)
    return True


def rounds_done(run_dir: Path) -> int:
    """The round of the run directory's checkpoint (0 without one): what ``--resume``
    continues after. Not the summary's last round: a run stopped between writing the
    summary and the checkpoint leaves the summary one round ahead."""
    from fedtune.flower.checkpoint import CheckpointError, load_checkpoint

    try:
        return int(load_checkpoint(run_dir)["round"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return 0


def load_run_scenario(run_dir: Path) -> Scenario:
    """The scenario a run directory was started with (what a resume must continue)."""
    path = Path(run_dir) / SCENARIO_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a fedtune run directory (no {SCENARIO_FILE})")
    return build_scenario(json.loads(path.read_text()), origin=str(path))


def resumed_scenario(run_dir: Path, overrides: list[str]) -> Scenario:
    """The scenario ``--resume RUN_DIR --set ...`` continues: the saved one, with the
    overrides that can change safely (``checkpoint.RESUMABLE_KEYS``: more rounds).
    Any other key that would change is refused by name, never silently ignored."""
    from fedtune.flower.checkpoint import RESUMABLE_KEYS

    saved = load_run_scenario(run_dir)
    flat = {}
    for text in overrides:
        section, key, value = parse_override(text)
        flat[f"{section}.{key}"] = value
    if not flat:
        return saved
    changed = build_scenario(apply_overrides(saved.to_dict(), flat),
                             origin=f"{run_dir / SCENARIO_FILE} with --set")
    before, after = saved.to_dict(), changed.to_dict()
    different = sorted(f"{section}.{key}" for section, values in after.items()
                       for key, value in values.items() if before[section].get(key) != value)
    refused = [key for key in different if key not in RESUMABLE_KEYS]
    if refused:
        raise ConfigError(
            f"--resume cannot change {', '.join(refused)}: the checkpoint was made under "
            f"the saved scenario; only {', '.join(RESUMABLE_KEYS)} can change on a resume "
            "(start a new run to change the others)")
    done = rounds_done(run_dir)
    if "run.rounds" in different:
        if changed.run.rounds < done:
            raise ConfigError(f"--set run.rounds={changed.run.rounds}: {done} rounds of "
                              f"{run_dir} are already done")
        if saved.privacy.client_level:
            raise ConfigError("--resume cannot change run.rounds under client-level DP: "
                              "the noise and the privacy budget were planned for "
                              f"{saved.run.rounds} rounds")
    return changed


def check_resumable(scenario: Scenario) -> None:
    """A resumed run is a new Flower run: each client's run state starts empty. For
    DP-SGD that state is the client's own privacy accountant, so a resume would report
    too small an epsilon; refuse rather than under-count."""
    if scenario.privacy.sample_level:
        raise ConfigError(
            "this run trains with DP-SGD (privacy.sample_noise_multiplier > 0): each client's "
            "accountant lives in its Flower run state, which a resumed run does not have, "
            "so its epsilon would be under-counted; start a new run instead")
