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
from pathlib import Path
from typing import Any

from fedtune.config import Scenario
from fedtune.flower.rounds import OnReplies
from fedtune.flower.server_app import Progress
from fedtune.runs import SimulationError
from fedtune.runs.rundir import SUMMARY_FILE, new_run_dir

log = logging.getLogger("fedtune")


class _HideRunSimulationDeprecation(logging.Filter):
    """fedtune drives Flower's simulation engine through ``run_simulation`` on purpose
    (its Python entry point); ``flwr run`` is documented as the alternative."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


def preflight(scenario: Scenario) -> None:
    """Fail before any work starts if data or model cannot be found."""
    from fedtune.data import clients_of
    from fedtune.model.loading import bundled_model_dir, check_model_source
    from fedtune.planning.client_settings import check_ranks_fit_model, client_settings

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
                   nodes: list[Any] | None = None, address: str = "") -> dict[str, Any]:
    """Ray resources per virtual client; workers' own output only with ``verbose``
    (a client's failure still reaches the server as an error reply and is reported).

    With ``nodes`` (the live nodes of the cluster at ``address`` this process has joined,
    see ``fedtune.runs.cluster.joined``) the request is checked against each node's size and Ray
    is left as it is; without, against this machine, for a private Ray instance
    (``address="local"``: neither ``RAY_ADDRESS`` nor a cluster ``ray start`` left here
    is joined by accident)."""
    sim = scenario.simulation
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


def simulate(
    scenario: Scenario,
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
    verbose: bool = False,
    resume: Path | None = None,
    on_replies: OnReplies | None = None,
) -> Path:
    """Run ``scenario`` with virtual clients; return the run directory. With ``resume``
    (a run directory with a checkpoint), go on from its last completed round.
    ``progress`` hears of each round as it ends, ``on_replies`` of the clients finished
    so far within a round (``fedtune.flower.rounds.ReplyProgress``)."""
    from flwr.simulation import run_simulation

    from fedtune.flower import ray_backend, simulated_nodes
    from fedtune.flower.client_app import make_client_app
    from fedtune.flower.server_app import make_server_app
    from fedtune.runs.cluster import joined, resolve_address

    address = resolve_address(scenario.simulation.ray_address)
    with contextlib.ExitStack() as cluster:
        nodes = None if address is None else cluster.enter_context(joined(address, verbose))
        config = backend_config(scenario, verbose, nodes, address or "")
        preflight(scenario)
        run_dir = resume or new_run_dir(out_dir or scenario.run.out_dir, scenario.run.name)
        if not verbose:
            flwr_log = logging.getLogger("flwr")
            flwr_log.setLevel(logging.WARNING)
            if not any(isinstance(f, _HideRunSimulationDeprecation) for f in flwr_log.filters):
                flwr_log.addFilter(_HideRunSimulationDeprecation())
        try:
            with simulated_nodes.recording(), ray_backend.installed():
                run_simulation(
                    server_app=make_server_app(scenario, run_dir, progress,
                                               resume=resume is not None,
                                               on_replies=on_replies),
                    client_app=make_client_app(scenario),
                    num_supernodes=scenario.data.num_clients,
                    backend_name=scenario.simulation.backend,
                    backend_config=config,
                    verbose_logging=verbose,
                )
        except Exception as err:
            raise SimulationError(f"simulation failed: {err} (run directory: {run_dir})"
                                  ) from err
    return completed(scenario, run_dir)


def completed(scenario: Scenario, run_dir: Path) -> Path:
    """``run_dir`` once its run has completed, with the held-out replies of the base and
    the adapter added (``fedtune.runs.generations``); a SimulationError if it did not
    complete."""
    from fedtune.runs.generations import write_generations

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    if summary.get("status") != "completed":
        raise SimulationError(f"simulation ended with status {summary.get('status')!r}; "
                              f"see {run_dir}")
    write_generations(scenario, run_dir)
    return run_dir
