"""The run directory: metrics as JSONL, a summary JSON, a loss plot, the final adapter,
and (simulations) held-out replies of the base and the adapter (``generations.json``,
see ``fedtune.runs.generations``).

Every file that is rewritten (summary, plot, adapter) is written to a temporary name
and renamed, so a crash never leaves a half-written file; ``metrics.jsonl`` is
append-only and flushed line by line.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.core.files import atomic_file, open_private_append, private_folder
from fedtune.runs.report import REPORT_FILE, render_report, round_axis

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SCENARIO_FILE = "scenario.json"
PLOT_FILE = "loss.png"
ADAPTER_DIR = "adapter"
GENERATIONS_FILE = "generations.json"


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    """The run's report.html (see ``fedtune.runs.report``), with the run directory's
    generations when it has them, replaced atomically."""
    path = Path(run_dir) / REPORT_FILE
    generations = Path(run_dir) / GENERATIONS_FILE
    pairs = json.loads(generations.read_text()) if generations.is_file() else []
    atomic_write_text(path, render_report(summary, pairs))
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    with atomic_file(path) as handle:
        handle.write(text)


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """A fresh, unique run directory ``<out_dir>/<name>-<UTC timestamp>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(out_dir) / f"{name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700)  # private: the summary, adapter and checkpoints are the run's
    return private_folder(path)


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")


def eval_tokens(scenario: dict[str, Any]) -> str:
    """Which tokens the held-out loss and perplexity are over: "assistant" (a chat template
    with assistant-only loss) or "all" (see ``DataSpec.loss_tokens``)."""
    from fedtune.config import DataSpec

    try:
        return DataSpec(**scenario.get("data", {})).loss_tokens
    except (TypeError, ValueError):  # a scenario written by another fedtune version
        return "all"


@dataclass
class RunRecorder:
    """Collects per-client and per-round metrics and keeps the run directory current."""

    path: Path
    scenario: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    #: why the run failed (the error that ended it), when it did
    error: str | None = None
    #: privacy plan and outcome (noise multiplier, epsilon spent, early stop), when DP is on
    privacy: dict[str, Any] | None = None
    #: simulations: which device the clients train on, their GPU share, and why
    device: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        private_folder(self.path)
        atomic_write_text(self.path / SCENARIO_FILE, json.dumps(self.scenario, indent=2))
        self._metrics = open_private_append(self.path / METRICS_FILE)  # closed in close()
        self.write_summary()

    def log_client(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
        self._metrics.flush()

    def log_initial_eval(self, eval_loss: float) -> None:
        self.initial = {"eval_loss": eval_loss, "eval_perplexity": perplexity(eval_loss)}
        self.write_summary()

    def log_round(self, record: dict[str, Any]) -> None:
        record = dict(record)
        record["eval_perplexity"] = perplexity(record.get("eval_loss"))
        self.rounds.append(record)
        self.write_summary()
        self.write_plot()

    def state(self) -> str:
        """What a resumed run needs to continue this record (JSON, for the checkpoint)."""
        return json.dumps({"rounds": self.rounds, "initial": self.initial})

    def restore(self, state: str) -> None:
        """Continue the record of a checkpoint (rounds after it are forgotten: they rerun)."""
        saved = json.loads(state)
        self.rounds, self.initial, self.status = saved["rounds"], saved["initial"], "running"
        self.error = None
        self.write_summary()

    def summary(self) -> dict[str, Any]:
        last_eval = next((r for r in reversed(self.rounds) if r.get("eval_loss") is not None), {})
        return {
            "status": self.status,
            **({"error": self.error} if self.error is not None else {}),
            "scenario": self.scenario,
            "initial": self.initial,
            "rounds": self.rounds,
            "final": {
                "round": last_eval.get("round"),
                "eval_loss": last_eval.get("eval_loss"),
                "eval_perplexity": last_eval.get("eval_perplexity"),
            },
            "totals": self.totals(),
            "eval_tokens": eval_tokens(self.scenario),
            **({"privacy": self.privacy} if self.privacy is not None else {}),
            **({"device": self.device} if self.device is not None else {}),
        }

    def totals(self) -> dict[str, Any]:
        """Traffic and time over all rounds; ``upload_ratio`` is dense fp32 update bytes
        over the bytes that really travelled up (1.0 without compression). A total whose
        rounds published no value (client-level DP withholds bytes and durations) is
        None, not 0."""
        up, dense = self._total("bytes_up"), self._total("bytes_up_dense")
        return {
            "bytes_up": up,
            "bytes_down": self._total("bytes_down"),
            "bytes_up_dense": dense,
            "upload_ratio": dense / up if up and dense is not None else None,
            "seconds": self._total("seconds"),
        }

    def _total(self, key: str) -> Any:
        values = [r[key] for r in self.rounds if r.get(key) is not None]
        return sum(values) if values or not self.rounds else None

    def write_summary(self) -> None:
        atomic_write_text(self.path / SUMMARY_FILE, json.dumps(self.summary(), indent=2))

    def write_plot(self) -> None:
        """Held-out and training loss per round (round 0 = before training)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        eval_points = [(0, self.initial["eval_loss"])] if self.initial else []
        eval_points += [(r["round"], r["eval_loss"]) for r in self.rounds
                        if r.get("eval_loss") is not None]
        if eval_points:
            ax.plot(*zip(*eval_points, strict=True), marker="o", label="held-out loss")
        train_points = [(r["round"], r["train_loss"]) for r in self.rounds
                        if r.get("train_loss") is not None]
        if train_points:
            ax.plot(*zip(*train_points, strict=True), marker="s", linestyle="--",
                    label="train loss")
        round_axis(ax)
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(str(self.scenario.get("run", {}).get("name", "fedtune")))
        ax.grid(alpha=0.3)
        if train_points or eval_points:  # under client-level DP there may be neither
            ax.legend()
        with atomic_file(self.path / PLOT_FILE, "wb") as handle:
            fig.savefig(handle, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)

    def close(self, status: str, error: BaseException | str | None = None) -> None:
        """Final status; ``error`` is the exception that ended the run or why it stopped."""
        self.status = status
        if isinstance(error, BaseException):
            self.error = f"{type(error).__name__}: {error}"
        elif error is not None:
            self.error = error
        self.write_summary()
        self._metrics.close()
        try:
            write_report(self.path, self.summary())
        except Exception as err:  # noqa: BLE001 - a report must never hide the run's outcome
            logging.getLogger("fedtune").warning("could not write the run report: %s", err)
