"""What an application hands the SDK, checked and put in the shapes fedtune uses.

Every check here runs before anything connects, so a mistake surfaces where the
application calls fedtune, as one of the documented exception types: ``DataError`` for
data, ``ProfileError`` for a device profile, ``IncompatibleModelError`` for a model that
is not the federation's base, ``TypeError`` for an argument of the wrong kind.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.data.local import read_local_texts
from fedtune.data.records import RECORD_SHAPES, Record, parse_record
from fedtune.data.types import DataError
from fedtune.planning.profiles import DeviceProfile, ProfileError, load_profile

#: what ``data=`` may be, for messages
DATA_SHAPES = ("a list of strings, an iterable of dicts shaped " + RECORD_SHAPES
               + ", or the path of a *.jsonl / text file")


def texts_from(data: object) -> list[Record]:
    """The training records of ``data`` (see ``DATA_SHAPES``: texts, or conversations
    from dicts in any record shape); at least two, since one is held out to measure the
    federation's progress on this device."""
    if isinstance(data, (str, Path)):
        if isinstance(data, str) and "\n" in data:
            raise DataError("data is one string with line breaks; pass a list of texts, or "
                            "the path of a file")
        texts = read_local_texts(Path(data))
    elif isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise DataError(f"data must be {DATA_SHAPES}; got {type(data).__name__}")
    else:
        texts = [_text_of(i, item) for i, item in enumerate(data)]
    if len(texts) < 2:
        raise DataError(f"data has {len(texts)} text(s); need at least 2 (one to train on, "
                        "one held out)")
    return texts


def _text_of(index: int, item: object) -> Record:
    if isinstance(item, str):
        if not item.strip():
            raise DataError(f"data[{index}] is an empty string")
        return item
    if isinstance(item, Mapping):
        try:
            return parse_record(dict(item))
        except DataError as err:
            raise DataError(f"data[{index}]: {err}") from None
    raise DataError(f"data[{index}] is a {type(item).__name__}; each item must be a string "
                    f"or a dict shaped {RECORD_SHAPES}")


def check_lendable(model: Any, tokenizer: Any) -> Any:
    """A loaded transformers causal LM (not a peft wrapper) and its tokenizer; returns
    the tokenizer, found from the model's own name when not given."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    if isinstance(model, PeftModel):
        raise TypeError("model is a PeftModel; pass its base model (model.get_base_model() "
                        "or the model before adapters were added)")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a path, a model source name or a loaded transformers "
                        f"model, got {type(model).__name__}")
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    name = getattr(model.config, "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        raise TypeError(f"no tokenizer found for the given model ({name or 'no name'}); pass "
                        "tokenizer=") from None


def available_memory_mb() -> tuple[str, float]:
    """(device, MiB free to train with): free GPU memory, else available RAM."""
    import psutil
    import torch

    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return "cuda", free / 2**20
    return "cpu", psutil.virtual_memory().available / 2**20


def auto_profile(rank: int | None = None, share: float = 0.8) -> DeviceProfile:
    """This device as a profile: ``share`` of its free memory; quantization (and the rank,
    unless given) left to the server's memory estimator."""
    device, free_mb = available_memory_mb()
    return DeviceProfile(name=f"auto-{device}", memory_budget_mb=round(free_mb * share, 1),
                         device=device, hardware=socket.gethostname(),
                         description="measured by the fedtune SDK", quantization="auto",
                         rank=rank if rank is not None else "auto")


def profile_file(profile: str | DeviceProfile | None, folder: Path,
                 rank: int | None = None) -> str:
    """The profile a client declares, as a bundled name or a TOML path ("" = the server's
    defaults); "auto" measures this device (see ``auto_profile``)."""
    if profile is None or profile == "":
        return ""
    if profile == "auto":
        profile = auto_profile(rank)
    if isinstance(profile, DeviceProfile):
        path = folder / "profile.toml"
        fields = {k: v for k, v in vars(profile).items() if v != ""}
        path.write_text(tomli_w.dumps(fields))
        return str(path)
    if not isinstance(profile, str):
        raise TypeError(f"profile must be a name, a .toml path, 'auto' or a DeviceProfile, "
                        f"got {type(profile).__name__}")
    load_profile(profile)  # ProfileError names the problem
    return profile


def client_name(name: str | None, folder: Path) -> str:
    """A stable name: the one given, else the one this state folder already has, else a
    new one kept there (the server finds a returning client by its name)."""
    kept = folder / "client-name"
    if name:
        return name
    if kept.is_file() and kept.read_text().strip():
        return kept.read_text().strip()
    fresh = f"{socket.gethostname()}-{secrets.token_hex(4)}".lower()
    kept.write_text(fresh)
    return fresh


__all__ = ["DATA_SHAPES", "DataError", "ProfileError", "auto_profile", "check_lendable",
           "client_name", "profile_file", "texts_from"]
