"""Base-model loading, LoRA adapters and the per-process model cache.

The names below load on first use, so that ``fedtune.model.sources`` and
``fedtune.model.memory`` (planning: where a model is, its dimensions, what fits) import
without the model stack. bitsandbytes is imported here, before anything can import peft,
which imports it: see ``fedtune.model.imports``.
"""

import importlib

from fedtune.model.imports import import_bitsandbytes

import_bitsandbytes()

#: public name -> the module of this package that defines it
_EXPORTS = {
    "CacheInfo": "cache", "cache_info": "cache", "clear": "cache", "get_peft_model": "cache",
    "current_rss_mb": "device", "peak_memory_mb": "device", "pick_device": "device",
    "ModelNotFoundError": "sources", "ModelSpec": "loading", "bundled_model_dir": "loading",
    "cache_root": "sources", "load_base_model": "loading",
    "LoraSpec": "lora", "adapter_state": "lora", "attach_lora": "lora",
    "base_model_name": "lora", "load_adapter_state": "lora", "reset_lora": "lora",
    "save_peft_adapter": "lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedtune.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedtune.model.{_EXPORTS[name]}"), name)
