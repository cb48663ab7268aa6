"""Per-process cache of LoRA-wrapped base models.

Loading a base model costs seconds and hundreds of MB; a simulation process serves many
virtual clients over many rounds, so it loads each base (model spec) once and callers
swap adapter state in (``load_adapter_state`` / ``reset_lora``) instead of reloading.
Clients of different LoRA ranks share the base: each LoRA spec is its own (small)
adapter on it, and the one asked for is made the active, trainable one. Use a run-level
seed in the key, not a per-client one, or every client pays a full load.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

from peft import PeftModel

from fedtune.config import LoraSpec, ModelSpec
from fedtune.model.loading import load_base_model
from fedtune.model.lora import activate, adapter_name, attach_lora, ensure_adapter

_Key = tuple[ModelSpec, int]


class CacheInfo(NamedTuple):
    """``loads``: base models loaded; ``hits``: calls served from memory; ``size``: entries."""

    loads: int
    hits: int
    size: int


_lock = threading.Lock()
_entries: dict[_Key, tuple[PeftModel, Any]] = {}
_stats = {"loads": 0, "hits": 0}


def get_peft_model(model_spec: ModelSpec, lora_spec: LoraSpec, seed: int) -> tuple[PeftModel, Any]:
    """Return the process-wide (model, tokenizer) for this key, loading on first use.

    The returned object is shared: its adapter holds whatever the last caller left, so
    reset or load adapter state before use. The adapter for ``lora_spec`` is the only
    active one on return.
    """
    key = (model_spec, int(seed))
    with _lock:  # held while loading so concurrent callers never load the same model twice
        if key in _entries:
            _stats["hits"] += 1
            model, tokenizer = _entries[key]
            activate(model, ensure_adapter(model, lora_spec, seed))
            return model, tokenizer
        base, tokenizer = load_base_model(model_spec)
        entry = (attach_lora(base, lora_spec, seed, adapter=adapter_name(lora_spec)), tokenizer)
        _entries[key] = entry
        _stats["loads"] += 1
        return entry


def cache_info() -> CacheInfo:
    with _lock:
        return CacheInfo(loads=_stats["loads"], hits=_stats["hits"], size=len(_entries))


def release(source: str) -> None:
    """Forget the cached bases loaded from ``source``. A lent model (see
    ``fedtune.model.loading.register_model``) gets its LoRA layers taken out again, so
    the application gets back the model it lent, unchanged."""
    from fedtune.model.loading import lent_model

    with _lock:
        for key in [k for k in _entries if k[0].source == source]:
            model, _ = _entries.pop(key)
            if lent_model(source) is not None:
                model.unload()


def give_back(source: str) -> None:
    """End the loan of a model lent under ``source``: its LoRA layers out, its name freed."""
    from fedtune.model.loading import unregister_model

    release(source)
    unregister_model(source)


def clear() -> None:
    """Drop cached models (and reset counters) so their memory can be reclaimed."""
    with _lock:
        _entries.clear()
        _stats.update(loads=0, hits=0)
