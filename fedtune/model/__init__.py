"""Base-model loading, LoRA adapters and the per-process model cache."""

from fedtune.model.imports import import_bitsandbytes

import_bitsandbytes()  # before peft imports it: see fedtune.model.imports

from fedtune.model.cache import CacheInfo, cache_info, clear, get_peft_model  # noqa: E402
from fedtune.model.device import current_rss_mb, peak_memory_mb, pick_device  # noqa: E402
from fedtune.model.loading import (  # noqa: E402
    ModelNotFoundError,
    ModelSpec,
    bundled_model_dir,
    cache_root,
    load_base_model,
)
from fedtune.model.lora import (  # noqa: E402
    LoraSpec,
    adapter_state,
    attach_lora,
    base_model_name,
    load_adapter_state,
    reset_lora,
    save_peft_adapter,
)

__all__ = [
    "CacheInfo",
    "LoraSpec",
    "ModelNotFoundError",
    "ModelSpec",
    "adapter_state",
    "attach_lora",
    "base_model_name",
    "bundled_model_dir",
    "cache_info",
    "cache_root",
    "clear",
    "current_rss_mb",
    "get_peft_model",
    "load_adapter_state",
    "load_base_model",
    "peak_memory_mb",
    "pick_device",
    "reset_lora",
    "save_peft_adapter",
]
