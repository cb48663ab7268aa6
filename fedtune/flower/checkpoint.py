"""Checkpoints of a running federation: everything the server needs to go on after a crash.

One file per run directory, ``checkpoint.pt``, rewritten after every completed round
through a temporary file and ``os.replace`` (atomic on POSIX), so a crash leaves the
previous round's checkpoint or the new one, never half of one. It is loaded with
``weights_only=True``: tensors, numbers, strings, lists and dicts only, no pickled code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedtune.core.adapters import GlobalAdapter, LoraFactors
from fedtune.core.files import atomic_file

CHECKPOINT_FILE = "checkpoint.pt"
VERSION = 1


#: scenario keys a resumed run may change (``fedtune server --resume RUN --set``): more
#: rounds continue the same run; every other key is part of what the checkpoint means
RESUMABLE_KEYS = ("run.rounds",)


def same_run(saved_scenario_json: str, scenario_json: str) -> bool:
    """Whether a checkpoint's scenario and a resumed run's differ at most in
    :data:`RESUMABLE_KEYS`."""
    import json

    saved, now = json.loads(saved_scenario_json), json.loads(scenario_json)
    for dotted in RESUMABLE_KEYS:
        section, key = dotted.split(".", 1)
        for scenario in (saved, now):
            scenario.get(section, {}).pop(key, None)
    return bool(saved == now)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically (re)write ``run_dir/checkpoint.pt``."""
    target = Path(run_dir) / CHECKPOINT_FILE
    with atomic_file(target, "wb") as handle:
        torch.save({"version": VERSION, **state}, handle)
    return target


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The last completed round's state, or CheckpointError saying what is wrong."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT_FILE}: no round of that run "
                              "completed (or it is not a fedtune run directory)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a fedtune checkpoint of version {VERSION}")
    return state


def adapter_to_state(adapter: GlobalAdapter | None) -> dict[str, Any] | None:
    if adapter is None:
        return None
    return {"round": adapter.round,
            "factors": {name: {"A": f.A, "B": f.B, "scale": f.scale}
                        for name, f in adapter.factors.items()}}


def adapter_from_state(state: dict[str, Any] | None) -> GlobalAdapter | None:
    if state is None:
        return None
    factors = {name: LoraFactors(A=f["A"], B=f["B"], scale=float(f["scale"]))
               for name, f in state["factors"].items()}
    return GlobalAdapter(factors, round=int(state["round"]))


def rng_to_state(rng_state: tuple[Any, ...]) -> list[Any]:
    """``random.Random.getstate()`` as plain lists (what ``weights_only`` accepts)."""
    version, internal, gauss = rng_state
    return [version, list(internal), gauss]


def rng_from_state(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
