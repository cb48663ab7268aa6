"""Simulation on Flower's simulation engine (Ray backend): a private Ray instance on this
machine, or an existing Ray cluster (``simulation.ray_address``, see ``fedtune.runs.cluster``).

Everything that can fail cheaply (scenario values, data, model location) is checked
before the run directory is created or the engine starts, so a bad start leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedtune.config import Scenario
from fedtune.flower.rounds import OnReplies
from fedtune.flower.server_app import Progress
from fedtune.flower.stop import RunStopped, StopRequest
from fedtune.planning.gpu_share import simulation_device
from fedtune.runs import SimulationError
from fedtune.runs.lifecycle import (
    Interrupted,
    mark_stopped,
    rounds_done,
    signal_name,
    stop_signals,
)
from fedtune.runs.rundir import SCENARIO_FILE, SUMMARY_FILE, new_run_dir

log = logging.getLogger("fedtune")


class _HideRunSimulationDeprecation(logging.Filter):
    """fedtune drives Flower's simulation engine through ``run_simulation`` on purpose
    (its Python entry point); ``flwr run`` is documented as the alternative."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


@contextlib.contextmanager
def quiet_third_parties() -> Iterator[None]:
    """A simulation's output without what only clutters it: Ray's FutureWarning about
    ``num_gpus=0`` (fedtune sizes each client's GPU share itself, see
    :func:`backend_config`, and relies on Ray hiding the GPUs from a client that has
    none) and transformers' "Loading weights" bar, which a log keeps as one long line
    of carriage returns (Ray workers inherit the environment variable)."""
    from transformers.utils import logging as hf_logging

    bars, variable = hf_logging.is_progress_bar_enabled(), "HF_HUB_DISABLE_PROGRESS_BARS"
    saved = os.environ.get(variable)
    os.environ[variable] = "1"
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray",
                                    category=FutureWarning)
            yield
    finally:
        if saved is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved
        if bars:
            hf_logging.enable_progress_bar()


def check_output_folder(out_dir: str | Path, resume: Path | None = None) -> None:
    """Before anything is made: the folder that gets the run directory can be one (or
    ``resume`` is a run directory with a checkpoint)."""
    from fedtune.flower.checkpoint import CHECKPOINT_FILE

    if resume is not None:
        if not Path(resume).is_dir():
            raise SimulationError(f"--resume {resume}: no such run directory")
        if not (Path(resume) / CHECKPOINT_FILE).is_file():
            raise SimulationError(f"--resume {resume}: no {CHECKPOINT_FILE} there (no round "
                                  "of that run completed); start it again instead")
        return
    path = Path(out_dir)
    for folder in (path, *path.parents):
        if not folder.exists():
            continue
        if not folder.is_dir():
            what = "is a file" if folder == path else f"is inside {folder}, a file"
            raise SimulationError(f"output folder {out_dir} {what}, not a folder (--out or "
                                  "run.out_dir: where run directories are made)")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SimulationError(f"output folder {out_dir}: cannot write in {folder}")
        return


def check_device(preference: str) -> None:
    """``model.device`` names a device this machine has (CUDA asked for, none here)."""
    if not preference.startswith("cuda"):
        return
    from fedtune.model.device import pick_device

    try:
        pick_device(preference)
    except RuntimeError as err:
        raise SimulationError(f"model.device = {preference!r}: {err}") from None


def simulation_start(scenario: str | None, overrides: list[str], resume: Path | None,
                     out_dir: str | Path | None = None) -> Scenario:
    """The scenario ``fedtune simulate -s SCENARIO --set ... --out DIR`` (or ``--resume
    RUN_DIR --set ...``) runs, checked before anything is started or made: ConfigError
    naming what is wrong with the arguments, SimulationError with this machine (an
    output folder that is a file, a device that is not here)."""
    from fedtune.config import ConfigError, load_scenario
    from fedtune.runs.lifecycle import check_resumable, resumed_scenario

    if resume is not None:
        if scenario is not None:
            raise ConfigError("give -s SCENARIO for a new run or --resume RUN_DIR to "
                              "continue one, not both")
        if not Path(resume).is_dir():
            raise ConfigError(f"--resume {resume}: no such run directory")
        chosen = resumed_scenario(Path(resume), overrides)
        check_resumable(chosen)
    else:
        if scenario is not None and Path(scenario).is_dir():
            if (Path(scenario) / SCENARIO_FILE).is_file():
                raise ConfigError(f"-s {scenario} is a run directory, not a scenario file; "
                                  f"continue it with: fedtune simulate --resume {scenario}")
            raise ConfigError(f"-s {scenario} is a folder, not a scenario file (.toml)")
        chosen = load_scenario(scenario, overrides)
    check_output_folder(out_dir or chosen.run.out_dir, resume)
    check_device(chosen.model.device)
    return chosen


def preflight(scenario: Scenario) -> None:
    """Fail before any work starts if data or model cannot be found."""
    from fedtune.data import clients_of
    from fedtune.model.loading import bundled_model_dir, check_model_source
    from fedtune.planning.client_settings import check_ranks_fit_model, client_settings

    check_device(scenario.model.device)
    data = scenario.data
    clients = clients_of(data, scenario.run.seed)
    if len(clients) < data.num_clients:
        raise SimulationError(
            f"data.num_clients = {data.num_clients} but the data has only {len(clients)} clients"
        )
    check_model_source(scenario.model.source)
    if scenario.model.source == "smollm2":
        bundled_model_dir()  # convert once here, not in every simulation worker at once
    settings = client_settings(scenario)  # profiles, ranks the aggregator can serve
    check_ranks_fit_model(scenario, settings)


def backend_config(scenario: Scenario, verbose: bool = False,
                   nodes: list[Any] | None = None, address: str = "",
                   gpus_per_client: float | None = None) -> dict[str, Any]:
    """Ray resources per virtual client; workers' own output only with ``verbose``
    (a client's failure still reaches the server as an error reply and is reported).

    With ``nodes`` (the live nodes of the cluster at ``address`` this process has joined,
    see ``fedtune.runs.cluster.joined``) the request is checked against each node's size and Ray
    is left as it is; without, against this machine, for a private Ray instance
    (``address="local"``: neither ``RAY_ADDRESS`` nor a cluster ``ray start`` left here
    is joined by accident)."""
    sim = scenario.simulation
    if gpus_per_client is not None and gpus_per_client != sim.gpus_per_client:
        from dataclasses import replace

        sim = replace(sim, gpus_per_client=gpus_per_client)
    resources = {"num_cpus": sim.cpus_per_client, "num_gpus": sim.gpus_per_client}
    if nodes is not None:
        from fedtune.runs.cluster import check_fits

        check_fits(sim, nodes, address or sim.ray_address)
        return {"client_resources": resources,
                "init_args": {"logging_level": "error", "log_to_driver": verbose}}
    cpus = os.cpu_count() or 1
    if sim.cpus_per_client > cpus:
        raise SimulationError(
            f"simulation.cpus_per_client = {sim.cpus_per_client} exceeds the {cpus} CPUs here"
        )
    if sim.gpus_per_client > 0:
        import torch

        if not torch.cuda.is_available():
            raise SimulationError(
                f"simulation.gpus_per_client = {sim.gpus_per_client} but no CUDA GPU is visible"
            )
        if sim.gpus_per_client > torch.cuda.device_count():
            raise SimulationError(
                f"simulation.gpus_per_client = {sim.gpus_per_client} exceeds the "
                f"{torch.cuda.device_count()} GPU(s) here (fractions share one: 0.25 = four "
                "clients per GPU)")
    return {
        "client_resources": resources,
        "init_args": {"address": "local", "num_cpus": cpus, "include_dashboard": False,
                      "logging_level": "error", "log_to_driver": verbose},
    }


class SimulationInterrupted(SimulationError):
    """SIGTERM or SIGINT stopped the simulation: Ray and its workers are gone, the run
    directory keeps every completed round (its checkpoint) and says "interrupted"."""

    def __init__(self, signum: int, run_dir: Path | None, rounds_done: int,
                 completed: bool = False) -> None:
        self.signum, self.run_dir, self.rounds_done = signum, run_dir, rounds_done
        self.completed = completed  # every round was done: stopped generating replies
        where = "before the run directory was made" if run_dir is None else (
            f"after {rounds_done} completed round(s); run directory {run_dir}")
        if completed:
            where = (f"while generating the held-out replies; the run's {rounds_done} "
                     f"rounds completed; run directory {run_dir}")
        super().__init__(f"stopped by {signal_name(signum)} {where}")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process its signal ended."""
        return 128 + self.signum


Say = Callable[[str], None]


def simulate(
    scenario: Scenario,
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
    verbose: bool = False,
    resume: Path | None = None,
    on_replies: OnReplies | None = None,
    say: Say | None = None,
) -> Path:
    """Run ``scenario`` with virtual clients; return the run directory. With ``resume``
    (a run directory with a checkpoint), go on from its last completed round.
    ``progress`` hears of each round as it ends, ``on_replies`` of the clients finished
    so far within a round (``fedtune.flower.rounds.ReplyProgress``), ``say`` of what
    happens outside the rounds (the run directory once it exists, the held-out
    replies).

    In the main thread, SIGTERM and SIGINT stop the run (``fedtune.runs.lifecycle``):
    SimulationInterrupted once Ray and its workers are gone."""
    stop = StopRequest()
    engine = threading.Event()  # set while Flower's engine runs: its threads stop on `stop`
    started: list[Path] = []

    def on_signal(signum: int) -> bool:
        stop.request(f"interrupted by {signal_name(signum)}")
        return engine.is_set()

    with stop_signals(on_signal) as received, quiet_third_parties():
        try:
            return _simulate(scenario, out_dir, progress, verbose, resume, on_replies,
                             say or (lambda text: None), stop, engine, started)
        except (Interrupted, RunStopped):
            pass
    raise _interrupted(received[0], stop.reason, started[0] if started else None,
                       resume is not None)


def _interrupted(signum: int, reason: str, run_dir: Path | None, resumed: bool
                 ) -> SimulationInterrupted:
    """What a stop left: the summary marked "interrupted" (the round loop marks it
    itself when it ran; a stop before it leaves an empty new run directory, removed)."""
    if run_dir is None:
        return SimulationInterrupted(signum, None, 0)
    summary = run_dir / SUMMARY_FILE
    if not summary.is_file() and not resumed and not any(run_dir.iterdir()):
        run_dir.rmdir()
        return SimulationInterrupted(signum, None, 0)
    done = rounds_done(run_dir)
    with contextlib.suppress(OSError, json.JSONDecodeError):
        if json.loads(summary.read_text()).get("status") == "completed":
            return SimulationInterrupted(signum, run_dir, done, completed=True)
    mark_stopped(run_dir, "interrupted", reason)
    return SimulationInterrupted(signum, run_dir, done)


def _simulate(scenario: Scenario, out_dir: str | Path | None, progress: Progress | None,
              verbose: bool, resume: Path | None, on_replies: OnReplies | None, say: Say,
              stop: StopRequest, engine: threading.Event, started: list[Path]) -> Path:
    from flwr.simulation import run_simulation

    from fedtune.flower import ray_backend, simulated_nodes
    from fedtune.flower.client_app import make_client_app
    from fedtune.flower.server_app import make_server_app
    from fedtune.runs.cluster import joined, resolve_address

    address = resolve_address(scenario.simulation.ray_address)
    check_output_folder(out_dir or scenario.run.out_dir, resume)
    with contextlib.ExitStack() as cluster:
        nodes = None if address is None else cluster.enter_context(joined(address, verbose))
        preflight(scenario)
        # on a cluster the nodes' GPUs are not this machine's: gpus_per_client as set
        share, device = (simulation_device(scenario) if nodes is None else
                         (scenario.simulation.gpus_per_client, {
                             "trains_on": "cuda" if scenario.simulation.gpus_per_client
                             else "cpu", "gpus_per_client": scenario.simulation.gpus_per_client,
                             "why": "simulation.gpus_per_client on a Ray cluster"}))
        config = backend_config(scenario, verbose, nodes, address or "", share)
        run_dir = resume or new_run_dir(out_dir or scenario.run.out_dir, scenario.run.name)
        started.append(run_dir)
        say(f"run directory {run_dir}")
        if not verbose:
            flwr_log = logging.getLogger("flwr")
            flwr_log.setLevel(logging.WARNING)
            if not any(isinstance(f, _HideRunSimulationDeprecation) for f in flwr_log.filters):
                flwr_log.addFilter(_HideRunSimulationDeprecation())
        try:
            with simulated_nodes.recording(), ray_backend.installed(stop):
                engine.set()
                run_simulation(
                    server_app=make_server_app(scenario, run_dir, progress,
                                               resume=resume is not None,
                                               on_replies=on_replies, stop=stop,
                                               device=device),
                    client_app=make_client_app(scenario),
                    num_supernodes=scenario.data.num_clients,
                    backend_name=scenario.simulation.backend,
                    backend_config=config,
                    verbose_logging=verbose,
                )
        except RunStopped:
            raise
        except Exception as err:
            if stop:
                raise RunStopped(stop.reason) from None
            raise SimulationError(f"simulation failed: {err} (run directory: {run_dir})"
                                  ) from err
        finally:
            engine.clear()
        if stop:  # arrived after the last round: the engine ended on its own
            raise RunStopped(stop.reason)
    return completed(scenario, run_dir, say)


def completed(scenario: Scenario, run_dir: Path, say: Say | None = None) -> Path:
    """``run_dir`` once its run has completed, with the held-out replies of the base and
    the adapter added (``fedtune.runs.generations``); a SimulationError if it did not
    complete."""
    from fedtune.runs.generations import write_generations

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    if summary.get("status") != "completed":
        raise SimulationError(f"simulation ended with status {summary.get('status')!r}; "
                              f"see {run_dir}")
    if scenario.report.generations and say is not None:
        say(f"generating {scenario.report.generations} held-out replies of the base "
            "model and the adapter")
    write_generations(scenario, run_dir)
    return run_dir
