"""Base-model loading, LoRA adapters and the per-process model cache.

The names below load on first use, so that ``fedtune.model.sources`` and
``fedtune.model.memory`` (planning: where a model is, its dimensions, what fits) import
without the model stack. bitsandbytes is imported here, before anything can import peft,
which imports it: see ``fedtune.model.imports``.
"""

import importlib

from fedtune.model.imports import import_bitsandbytes

import_bitsandbytes()

#: public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("CacheInfo", "cache_info", "clear", "get_peft_model"), "fedtune.model.cache"),
    **dict.fromkeys(("current_rss_mb", "peak_memory_mb", "pick_device"), "fedtune.model.device"),
    **dict.fromkeys(("ModelNotFoundError", "cache_root"), "fedtune.model.sources"),
    **dict.fromkeys(("bundled_model_dir", "load_base_model"), "fedtune.model.loading"),
    **dict.fromkeys(("adapter_state", "attach_lora", "base_model_name", "load_adapter_state",
                     "reset_lora", "save_peft_adapter"), "fedtune.model.lora"),
    **dict.fromkeys(("LoraSpec", "ModelSpec"), "fedtune.config"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedtune.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
