"""The fedtune ServerApp: runs the rounds (``fedtune.flower.rounds``) and keeps the run
directory current (a record and a checkpoint after every round)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import Scenario, scenario_from_flat
from fedtune.flower import ray_nodes, secagg
from fedtune.flower.checkpoint import (
    CheckpointError,
    load_checkpoint,
    same_run,
    save_checkpoint,
)
from fedtune.flower.polling import bounded
from fedtune.flower.replies import federation_reply_budget
from fedtune.flower.rounds import OnReplies, announce_end, run_rounds
from fedtune.flower.stop import RunStopped, StoppableGrid, StopRequest
from fedtune.flower.strategy import FedtuneStrategy
from fedtune.planning.client_settings import check_ranks_fit_model, client_settings
from fedtune.privacy.publish import WITHHELD, adapter_bytes_by_rank, private_round
from fedtune.runs.rundir import ADAPTER_DIR, SCENARIO_FILE, RunRecorder, new_run_dir

log = logging.getLogger("fedtune")

Progress = Callable[[dict[str, Any]], None]


def save_global_adapter(strategy: FedtuneStrategy, scenario: Scenario, out: Path) -> Path | None:
    """Write the global adapter by the Hub's conventions (see
    ``fedtune.model.lora.save_global_factors``): peft's files with the configured
    lora_alpha, the base's tokenizer and a model card, all in one atomic folder."""
    from fedtune.model.lora import base_model_name, save_global_factors
    from fedtune.runs.model_card import MODEL_CARD, model_card

    adapter = strategy.global_adapter
    if adapter is None:
        return None
    rounds_done = adapter.round  # rounds aggregated into it

    def extras(folder: Path) -> None:
        _save_tokenizer(scenario.model.source, folder)
        card = model_card(scenario, rounds_done, privacy_report(strategy))
        (folder / MODEL_CARD).write_text(card, encoding="utf-8")

    return save_global_factors(out / ADAPTER_DIR, adapter.factors, scenario.lora,
                               base_model_name(scenario.model), extras=extras)


@functools.lru_cache(maxsize=2)
def _tokenizer(source: str) -> Any:
    from fedtune.model.loading import load_tokenizer

    return load_tokenizer(source)


def _save_tokenizer(source: str, folder: Path) -> None:
    """The base's tokenizer beside the adapter. A server that cannot load it (a base that
    only the clients hold) still exports the adapter, and says why it has none."""
    try:
        _tokenizer(source).save_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - the adapter matters more than its tokenizer
        log.warning("fedtune: the exported adapter has no tokenizer: could not load the "
                    "tokenizer of model source %r here: %s", source, err)


def run_federation(
    grid: Grid, scenario: Scenario, run_dir: Path, progress: Progress | None = None,
    resume: bool = False, on_replies: OnReplies | None = None,
    stop: StopRequest | None = None, device: dict[str, Any] | None = None,
) -> RunRecorder:
    """Run every round of ``scenario`` on ``grid``, recording into ``run_dir`` and saving
    a checkpoint after each completed round; with ``resume``, go on from the run
    directory's checkpoint (see ``fedtune.flower.checkpoint``). ``progress`` hears of
    each round as it ends, ``on_replies`` of each client's reply within a round.

    On a failure the last global adapter (if any round completed) is still exported.
    Once ``stop`` is set the run ends at its next grid call (``fedtune.flower.stop``),
    "interrupted" with every completed round kept, whatever the round in progress
    failed with meanwhile."""
    strategy = FedtuneStrategy(scenario)  # validates client settings before any file
    first_round, saved = 1, None
    if resume:
        saved = load_checkpoint(run_dir)
        first_round = restore(strategy, scenario, run_dir, saved)
    recorder = RunRecorder(run_dir, scenario.to_dict(), device=device)
    if saved is not None:
        recorder.restore(saved["recorder"])
    report = progress or (lambda record: None)

    def on_round(record: dict[str, Any]) -> None:
        record = published(strategy, record)  # the one place a round record leaves
        if record["round"] == 0:
            if record["eval_loss"] is not None:
                recorder.log_initial_eval(record["eval_loss"])
        else:
            recorder.log_round(record)
            save_checkpoint(run_dir, {"round": record["round"], "scenario": scenario.to_json(),
                                      "strategy": strategy.state_dict(),
                                      "recorder": recorder.state()})
            save_global_adapter(strategy, scenario, run_dir)  # the latest, for any reader
        report(record)

    def on_client(record: dict[str, Any]) -> None:
        recorder.log_client(ray_nodes.describe(record))  # Ray node numbers as text

    strategy.on_client = on_client
    recorder.privacy = privacy_report(strategy)
    if scenario.privacy.reproducible and strategy.dp is not None:
        log.warning("fedtune: privacy.reproducible = true: the client sample and the noise "
                    "follow run.seed; this is an experiment, its epsilon does not hold "
                    "against anyone who knows the seed")
    try:
        run_rounds(strategy, grid, on_round, first_round, on_replies)
        save_global_adapter(strategy, scenario, run_dir)
        _announce_end(strategy, grid, recorder)
    except BaseException as err:
        if stop:
            recorder.close("interrupted", stop.reason or "interrupted")
        else:
            recorder.close("failed", err)
        if strategy.global_adapter is not None:
            save_global_adapter(strategy, scenario, run_dir)
        raise
    recorder.privacy = privacy_report(strategy)
    recorder.close("completed")
    return recorder


def _announce_end(strategy: FedtuneStrategy, grid: Grid, recorder: RunRecorder) -> None:
    """Send the final adapter to the deployed clients; the run's result is already saved,
    so a client that cannot be told is only logged."""
    last = recorder.rounds[-1]["round"] if recorder.rounds else 0
    try:
        announce_end(strategy, grid, last)
    except Exception as err:  # noqa: BLE001 - the run itself completed
        log.warning("fedtune: could not tell the clients that the run ended: %s", err)


def restore(strategy: FedtuneStrategy, scenario: Scenario, run_dir: Path,
            state: dict[str, Any] | None = None) -> int:
    """Load the run directory's checkpoint (or ``state``, already read from it) into
    ``strategy``; the next round to run."""
    state = load_checkpoint(run_dir) if state is None else state
    if not same_run(state["scenario"], scenario.to_json()):
        raise CheckpointError(f"{run_dir} was run with another scenario; resume it with the "
                              f"scenario it saved ({run_dir / SCENARIO_FILE})")
    strategy.load_state_dict(state["strategy"])
    done = int(state["round"])
    log.info("fedtune: resuming %s after round %d of %d", run_dir, done, scenario.run.rounds)
    return done + 1


def published(strategy: FedtuneStrategy, record: dict[str, Any]) -> dict[str, Any]:
    """A round's record as the run directory, the checkpoint and the progress line get
    it: under client-level DP counts and the mechanism's numbers only
    (``fedtune.privacy.publish``), whichever path (plain or secure) built it."""
    return record if strategy.dp is None else private_round(record)


def privacy_report(strategy: FedtuneStrategy) -> dict[str, Any] | None:
    """The summary's privacy section: the plan, what was spent, and any early stop."""
    p = strategy.scenario.privacy
    if not (p.client_level or p.sample_level or p.secure_aggregation):
        return None
    report: dict[str, Any] = {"mode": p.mode, "delta": p.delta, "accountant": p.accountant,
                              "reproducible": p.reproducible}
    if strategy.dp is not None:
        report.update(strategy.dp.report())
        report["federated_evaluation"] = (
            "on, NOT covered by epsilon (privacy.federated_eval = true: the clients' "
            "held-out losses are un-noised)" if strategy.federated_eval else "off")
        report["published_counts"] = ("clients sampled, replied, dropped per round (not "
                                      "covered by epsilon); never who")
        report["withheld"] = WITHHELD
        report["adapter_bytes_by_rank"] = adapter_bytes_by_rank(
            strategy.expected, {s.rank for s in strategy.settings})
    report.update(secagg.server_view(p, strategy.dp))
    if p.sample_level:
        report.update(sample_noise_multiplier=p.sample_noise_multiplier,
                      sample_clip_norm=p.sample_clip_norm)
    return report


def make_server_app(
    scenario: Scenario | None = None,
    run_dir: Path | None = None,
    progress: Progress | None = None,
    resume: bool = False,
    on_replies: OnReplies | None = None,
    stop: StopRequest | None = None,
    device: dict[str, Any] | None = None,
) -> ServerApp:
    """A ServerApp bound to a scenario and run directory, or reading both from the run
    config (``scenario`` file + ``section.key`` overrides, ``out`` folder or ``run-dir``,
    ``resume``) when None; with ``stop``, one that ends "interrupted" once it is set;
    ``device`` (which device the clients train on, and why) goes into the summary."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = context.run_config
        chosen = scenario if scenario is not None else scenario_from_flat(config)
        check_ranks_fit_model(chosen, client_settings(chosen))  # before any directory
        target = run_dir
        if target is None and config.get("run-dir"):
            target = Path(str(config["run-dir"]))
        if target is None:
            out = str(config.get("out", chosen.run.out_dir))
            target = new_run_dir(out, chosen.run.name)
        log.info("fedtune: writing run directory %s", target)
        resume_run = resume or bool(config.get("resume", False))
        budget = federation_reply_budget(chosen.model.source,
                                         tuple(chosen.lora.target_modules))
        grid = bounded(grid, budget)
        if stop is not None:
            grid = StoppableGrid(grid, stop)
        try:
            run_federation(grid, chosen, target, progress, resume=resume_run,
                           on_replies=on_replies, stop=stop, device=device)
        except RunStopped:  # recorded; the engine ends at once on a ServerApp that returns
            log.info("fedtune: %s", stop.reason if stop else "stopped")

    return app


app = make_server_app()
