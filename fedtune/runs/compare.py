"""One scenario under several aggregators and two baselines, with the same seed.

An aggregator's held-out perplexity says little on its own. Next to a centralised LoRA
(all clients' data in one place: what federation tries to approach) and local-only
training (each client alone: what federation must beat) it shows what collaboration buys
and, with the bytes per round, what it costs. Every method starts from the same base
model, sees the same data, and is scored by the same token-weighted held-out loss the
federation reports, so round 0 is one shared point and the curves are comparable.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fedtune.config import ConfigError, Scenario
from fedtune.core.seeds import client_seed
from fedtune.core.seeds import round_seed as federation_round_seed
from fedtune.data.tokenize import PackedData
from fedtune.planning.client_settings import ClientSettings
from fedtune.runs.rundir import SUMMARY_FILE, atomic_write_text, new_run_dir, perplexity
from fedtune.train import EvalResult, combine

CENTRALISED, SAME_WALL, LOCAL = "centralised", "centralised (same wall)", "local"
#: centralised: as many optimizer steps per round as all sampled clients together (the
#: compute the federation spends); same wall: as many as one client (the wall-clock time
#: of a round); local: every client alone
BASELINES = (CENTRALISED, SAME_WALL, LOCAL)
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"
RUNS_DIR = "runs"

Progress = Callable[[dict[str, Any]], None]


@dataclass
class MethodResult:
    """One line of the comparison: a federated run or a baseline, or why it did not run."""

    name: str
    kind: str  # "federated" | "baseline"
    status: str = "completed"  # "completed" | "skipped" | "failed"
    reason: str | None = None
    run_dir: str | None = None
    seconds: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)  # round 0 = before training
    note: str | None = None  # what the table says next to the name (e.g. compute-matched)

    @property
    def final(self) -> dict[str, Any]:
        """The last evaluated round (federations may skip evaluation with eval_every)."""
        scored = [r for r in self.rounds if r.get("eval_loss") is not None]
        last = scored[-1] if scored else {}
        return {k: last.get(k) for k in ("round", "eval_loss", "eval_perplexity")}

    def bytes_total(self, key: str) -> int:
        return int(sum(r.get(key, 0) for r in self.rounds))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "status": self.status, "reason": self.reason,
            "note": self.note, "run_dir": self.run_dir, "seconds": self.seconds,
            "rounds": self.rounds,
            "final": self.final, "bytes_up_total": self.bytes_total("bytes_up"),
            "bytes_down_total": self.bytes_total("bytes_down"),
        }


# ---- checks ------------------------------------------------------------------------------
def check_methods(aggregators: Sequence[str], baselines: Sequence[str]) -> None:
    """Unknown names are a configuration error before any work starts (typos cost hours)."""
    from fedtune.aggregation import available

    unknown = [a for a in aggregators if a not in available()]
    if unknown:
        raise ConfigError(f"unknown aggregator(s) {unknown}; available: {', '.join(available())}")
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ConfigError(f"unknown baseline(s) {bad}; available: {', '.join(BASELINES)}")
    if not aggregators and not baselines:
        raise ConfigError("nothing to compare: give at least one aggregator or baseline")


def with_aggregator(scenario: Scenario, name: str) -> Scenario:
    """The scenario under another aggregator; the run is named after it for a readable folder.
    Keys the aggregator does not read (e.g. HetLoRA's ``prune_gamma``, TIES ``merge`` for
    one that does not merge entry by entry) go back to their defaults."""
    return replace(
        scenario,
        run=replace(scenario.run, name=f"{scenario.run.name}-{name}"),
        federation=scenario.federation.for_aggregator(name),
    )


def skip_reason(scenario: Scenario) -> str | None:
    """Why this scenario cannot run (a configuration error), or None; other errors raise."""
    from fedtune.runs.simulate import preflight

    try:
        preflight(scenario)
    except ConfigError as err:
        return str(err)
    return None


# ---- federated runs -----------------------------------------------------------------------
def federated_result(name: str, run_dir: Path, seconds: float = 0.0) -> MethodResult:
    """Per-round held-out loss and bytes, read back from the run's own summary.json; the
    optimizer steps of a round are every client's that replied (each trains train.steps)."""
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    initial = summary.get("initial") or {}
    steps = int(summary["scenario"]["train"]["steps"])
    rounds = [_round_row(0, initial.get("eval_loss"), 0, 0)]
    rounds += [_round_row(r["round"], r.get("eval_loss"), r.get("bytes_up", 0),
                          r.get("bytes_down", 0), steps * int(r.get("clients_replied", 0)))
               for r in summary["rounds"]]
    return MethodResult(name, "federated", run_dir=str(run_dir), seconds=seconds, rounds=rounds)


def run_federated(scenario: Scenario, name: str, runs_dir: Path, progress: Progress,
                  skip: str | None = None) -> MethodResult:
    """Simulate under one aggregator; a configuration it cannot serve is skipped, not fatal,
    and a run that fails is recorded so the other methods still get compared."""
    from fedtune.runs.simulate import SimulationError, simulate

    if skip is not None:
        return MethodResult(name, "federated", status="skipped", reason=skip)

    def relay(record: dict[str, Any]) -> None:
        progress({"method": name, "stage": "round", "round": record["round"],
                  "eval_loss": record.get("eval_loss")})

    start = time.perf_counter()
    try:
        run_dir = simulate(with_aggregator(scenario, name), out_dir=runs_dir, progress=relay)
    except ConfigError as err:
        return MethodResult(name, "federated", status="skipped", reason=str(err))
    except SimulationError as err:
        return MethodResult(name, "federated", status="failed", reason=str(err))
    return federated_result(name, run_dir, time.perf_counter() - start)


# ---- baselines (in-process, no Flower) -----------------------------------------------------
def round_seed(scenario: Scenario, server_round: int, partition: int = 0) -> int:
    """The seed the federation gives client ``partition`` in a round: the same batch order."""
    return client_seed(federation_round_seed(scenario.run.seed, server_round), partition)


def base_evals(scenario: Scenario, settings: Sequence[ClientSettings]) -> list[EvalResult]:
    """Each client's base model on its held-out data: the federation's round 0."""
    from fedtune.train.held_out import evaluate_global

    return [evaluate_global(scenario, s, {}) for s in settings]


def evaluate_adapter(scenario: Scenario, settings: Sequence[ClientSettings],
                     state: dict[str, torch.Tensor]) -> EvalResult:
    """Score one adapter as the federation scores its global one: frozen, scale folded in,
    on every client's own base (its quantization), token-weighted over clients."""
    from fedtune.train.held_out import evaluate_global

    return combine([evaluate_global(scenario, s, state) for s in settings])


def _folded_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    from fedtune.core.codec import factors_from_state_dict, scale_folded_state_dict

    return scale_folded_state_dict(factors_from_state_dict(state, scale))


@dataclass
class Scored:
    """One round of a baseline: its held-out result and the optimizer steps it took."""

    result: EvalResult
    steps: int = 0


@dataclass
class Alone:
    """One round of a LoRA trained alone: the model, its LoRA, the steps it took."""

    model: Any
    state: dict[str, torch.Tensor]
    steps: int


def _rounds_alone(scenario: Scenario, trainee: Any, data: PackedData, partition: int = 0
                  ) -> Iterator[Alone]:
    """One LoRA trained round after round by a federated client's own session, each round
    continuing from the last (fresh optimizer, schedule restarted) with the seed the
    federation gives client ``partition``. The steps are counted as the training loop
    reports them (one call per optimizer step taken), not taken from the config."""
    from fedtune.train.session import TrainingSession

    state: dict[str, torch.Tensor] = {}
    for server_round in range(1, scenario.run.rounds + 1):
        session = TrainingSession(trainee, round_seed(scenario, server_round, partition), state)
        taken: list[int] = []
        state = session.run(data, lambda done, _loss, taken=taken: taken.append(done)
                            ).upload.state or {}
        yield Alone(session.model, state, len(taken))


def matched_steps(scenario: Scenario) -> int:
    """Optimizer steps per round of every sampled client together: the compute-matched
    centralised baseline takes this many per round (one batch of ``train.batch_size``)."""
    return scenario.sampled_per_round * scenario.train.steps


def centralised_baseline(scenario: Scenario, settings: Sequence[ClientSettings],
                         start: EvalResult, progress: Progress, steps: int | None = None,
                         name: str = CENTRALISED) -> list[Scored]:
    """One LoRA ([lora], [model]) on the union of every client's packed training blocks,
    ``steps`` optimizer steps per round (default: ``train.steps``, as one client).

    Each round's worth of steps is one training session, as a federated client trains, so
    only the data pooling (and the number of steps) differs.
    """
    from fedtune.train.batches import client_batch
    from fedtune.train.session import Trainee

    pooled = PackedData.cat([client_batch(scenario, s.partition).train for s in settings])
    trainee = Trainee.of(scenario)
    if steps is not None:
        trainee = replace(trainee, train=replace(trainee.train, steps=steps))
    history = [Scored(start)]
    for server_round, alone in enumerate(_rounds_alone(scenario, trainee, pooled), start=1):
        folded = _folded_state(alone.state, scenario.lora.scale)
        history.append(Scored(evaluate_adapter(scenario, settings, folded), alone.steps))
        _report(progress, name, server_round, history[-1].result)
    return history


def compute_matched_baseline(scenario: Scenario, settings: Sequence[ClientSettings],
                             start: EvalResult, progress: Progress) -> list[Scored]:
    return centralised_baseline(scenario, settings, start, progress, matched_steps(scenario))


def same_wall_baseline(scenario: Scenario, settings: Sequence[ClientSettings],
                       start: EvalResult, progress: Progress) -> list[Scored]:
    return centralised_baseline(scenario, settings, start, progress, name=SAME_WALL)


def _train_alone(scenario: Scenario, s: ClientSettings) -> list[Scored]:
    """One client's own LoRA on its own data, scored on its own held-out data per round."""
    from fedtune.train.batches import client_batch
    from fedtune.train.held_out import evaluate_client
    from fedtune.train.session import Trainee

    data = client_batch(scenario, s.partition, s.seq_len)
    rounds = _rounds_alone(scenario, Trainee.of(scenario, s), data.train, s.partition)
    return [Scored(evaluate_client(alone.model, scenario, s.partition, s.seq_len,
                                   s.batch_size), alone.steps) for alone in rounds]


def local_baseline(scenario: Scenario, settings: Sequence[ClientSettings],
                   start: EvalResult, progress: Progress) -> list[Scored]:
    """Every client alone (its own rank, alpha, quantization, batch); token-weighted mean."""
    per_client = []
    for s in settings:
        per_client.append(_train_alone(scenario, s))
        progress({"method": LOCAL, "stage": "client", "client": s.partition,
                  "clients": len(settings)})
    history = [Scored(start)] + [
        Scored(combine([r.result for r in rounds]), sum(r.steps for r in rounds))
        for rounds in zip(*per_client, strict=True)]
    for server_round, scored in enumerate(history[1:], start=1):
        _report(progress, LOCAL, server_round, scored.result)
    return history


#: each baseline's run, and what the table says beside its name
_BASELINE_RUNS = {CENTRALISED: compute_matched_baseline, SAME_WALL: same_wall_baseline,
                  LOCAL: local_baseline}


def baseline_note(name: str, scenario: Scenario) -> str | None:
    steps, clients = scenario.train.steps, scenario.sampled_per_round
    if name == CENTRALISED:
        return (f"compute-matched, {matched_steps(scenario)} optimizer steps per round = "
                f"{clients} sampled clients x {steps}, batch {scenario.train.batch_size}")
    if name == SAME_WALL:
        return f"{steps} optimizer steps per round, as one client"
    return None


def _report(progress: Progress, method: str, server_round: int, result: EvalResult) -> None:
    progress({"method": method, "stage": "round", "round": server_round,
              "eval_loss": result.loss})


def baseline_result(name: str, history: Sequence[Scored], seconds: float,
                    note: str | None = None) -> MethodResult:
    rows = [_round_row(i, r.result.loss, 0, 0, r.steps) for i, r in enumerate(history)]
    return MethodResult(name, "baseline", seconds=seconds, rounds=rows, note=note)


def run_baseline(name: str, scenario: Scenario, progress: Progress) -> MethodResult:
    """One baseline, or skipped when the scenario's client settings are invalid."""
    from fedtune.planning.client_settings import client_settings

    try:
        settings = client_settings(scenario)
    except ConfigError as err:
        return MethodResult(name, "baseline", status="skipped", reason=str(err))
    start = time.perf_counter()
    initial = combine(base_evals(scenario, settings))
    history = _BASELINE_RUNS[name](scenario, settings, initial, progress)
    return baseline_result(name, history, time.perf_counter() - start,
                           baseline_note(name, scenario))


def _round_row(server_round: int, loss: float | None, up: int, down: int, steps: int = 0
               ) -> dict[str, Any]:
    return {"round": server_round, "eval_loss": loss, "eval_perplexity": perplexity(loss),
            "bytes_up": int(up), "bytes_down": int(down), "optimizer_steps": int(steps)}


# ---- outputs ------------------------------------------------------------------------------
def _report_dict(scenario: Scenario, methods: Iterable[MethodResult], command: str,
                 status: str) -> dict[str, Any]:
    return {
        "status": status,
        "scenario": scenario.run.name,
        "seed": scenario.run.seed,
        "rounds": scenario.run.rounds,
        "steps_per_round": scenario.train.steps,
        "command": command,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "methods": {m.name: m.to_dict() for m in methods},
        "scenario_config": scenario.to_dict(),
    }


def _fmt_ppl(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _cell(text: str) -> str:
    """Markdown table cells hold one line and no bare pipes."""
    return " ".join(text.split()).replace("|", "\\|")


def _table_row(m: dict[str, Any]) -> str:
    label = m["name"]
    if m["kind"] == "baseline":
        note = m.get("note")
        label += f" (baseline: {note})" if note else " (baseline)"
    if m["status"] != "completed":
        return f"| {label} | {m['status']}: {_cell(m['reason'] or '')} | | | |"
    curve = " → ".join(_fmt_ppl(r["eval_perplexity"]) for r in m["rounds"])
    trained = max(1, len(m["rounds"]) - 1)
    up, down = m["bytes_up_total"] / trained, m["bytes_down_total"] / trained
    return (f"| {label} | {_fmt_ppl(m['final']['eval_perplexity'])} | {curve} | "
            f"{up:,.0f} | {down:,.0f} |")


def _baselines_said(report: dict[str, Any]) -> str:
    """What the centralised rows are, when the comparison has them."""
    if not {CENTRALISED, SAME_WALL} & set(report["methods"]):
        return ""
    return (" The centralised baselines pool every client's training data; 'centralised' is "
            "compute-matched (per round as many optimizer steps as all sampled clients "
            "together), 'centralised (same wall)' takes as many as one client.")


def render_markdown(report: dict[str, Any]) -> str:
    """The comparison table plus what is needed to reproduce it (seed, command)."""
    lines = [
        f"# Comparison: {report['scenario']}",
        "",
        f"Held-out perplexity over every client's held-out data (token-weighted), after each "
        f"round of {report['steps_per_round']} optimizer steps per client; round 0 is the "
        f"base model.{_baselines_said(report)} "
        "Bytes are means per round (0 for the in-process baselines).",
        "",
        "| method | final held-out perplexity | perplexity per round "
        "| upload bytes / round | download bytes / round |",
        "|---|---|---|---|---|",
        *(_table_row(m) for m in report["methods"].values()),
        "",
        f"Seed: {report['seed']}  ",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Held-out perplexity per round, one line per method, baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in report["methods"].values():
        points = [(r["round"], r["eval_perplexity"]) for r in m["rounds"]
                  if r["eval_perplexity"] is not None]
        if m["status"] != "completed" or not points:
            continue
        dashed = m["kind"] == "baseline"
        ax.plot(*zip(*points, strict=True), marker="s" if dashed else "o",
                linestyle="--" if dashed else "-", label=m["name"])
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{report['scenario']} (seed {report['seed']})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def write_outputs(folder: Path, report: dict[str, Any]) -> None:
    """All three files, each atomically, so a reader never sees half a comparison."""
    atomic_write_text(folder / COMPARISON_JSON, json.dumps(report, indent=2))
    atomic_write_text(folder / COMPARISON_MD, render_markdown(report))
    write_plot(report, folder / COMPARISON_PNG)


def describe_event(event: dict[str, Any]) -> str:
    """One human line per progress event (method start, round, client, outcome)."""
    method, stage = event["method"], event["stage"]
    if stage == "round":
        loss = event.get("eval_loss")
        return f"  {method} round {event['round']}: held-out loss " + (
            "n/a" if loss is None else f"{loss:.4f}")
    if stage == "client":
        return f"  {method}: client {event['client'] + 1}/{event['clients']} trained"
    if stage == "completed":
        return (f"{method}: done, final held-out perplexity "
                f"{_fmt_ppl(event.get('final_perplexity'))} ({event['seconds']:.1f} s)")
    if stage in ("skipped", "failed"):
        return f"{method}: {stage}: {event.get('reason')}"
    return f"{method}: running..."


def failed(folder: Path) -> list[str]:
    """Methods of a written comparison that ran and failed (skipped ones are not failures)."""
    report = json.loads((folder / COMPARISON_JSON).read_text())
    return [name for name, m in report["methods"].items() if m["status"] == "failed"]


# ---- entry point --------------------------------------------------------------------------
def run_comparison(
    scenario: Scenario,
    aggregators: Sequence[str],
    out_dir: str | Path,
    baselines: Sequence[str] = BASELINES,
    progress: Progress | None = None,
    command: str | None = None,
) -> Path:
    """Run every aggregator and baseline on ``scenario``; return the comparison folder.

    The outputs are rewritten after each method, so a long comparison that stops part-way
    still leaves the methods that finished.
    """
    aggregators = list(dict.fromkeys(aggregators))
    baselines = list(dict.fromkeys(baselines))
    check_methods(aggregators, baselines)
    report = progress or (lambda event: None)
    command = command or shlex.join(sys.argv)
    # checked first: a wrong data path or model raises here and leaves nothing behind
    skip_reason(scenario)
    skipped = {a: skip_reason(with_aggregator(scenario, a)) for a in aggregators}
    folder = new_run_dir(out_dir, f"compare-{scenario.run.name}")
    done: list[MethodResult] = []
    steps: list[tuple[str, Callable[[], MethodResult]]] = [
        (a, lambda a=a: run_federated(scenario, a, folder / RUNS_DIR, report, skipped[a]))
        for a in aggregators
    ] + [(b, lambda b=b: run_baseline(b, scenario, report)) for b in baselines]
    for name, step in steps:
        report({"method": name, "stage": "start"})
        result = step()
        done.append(result)
        report({"method": name, "stage": result.status, "reason": result.reason,
                "final_perplexity": result.final["eval_perplexity"],
                "seconds": result.seconds})
        write_outputs(folder, _report_dict(scenario, done, command, "running"))
    write_outputs(folder, _report_dict(scenario, done, command, "completed"))
    return folder
