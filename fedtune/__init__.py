"""fedtune: federated and edge fine-tuning of language models with quantized LoRA adapters."""

import logging as _logging
import os as _os

# No network here and no phoning home by default: Flower's update check and telemetry.
_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
_os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
_os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# bitsandbytes warns on every import on AVX512-BF16 CPUs that it cannot fetch an optional
# kernel from a hub; fedtune does not use that packed-weight path (keep_4bit_trainable).
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``from fedtune import Client`` etc.: the SDK (``fedtune.sdk``), imported on first
    use so that ``import fedtune`` and the command line stay light."""
    import importlib

    sdk = importlib.import_module("fedtune.sdk")
    if name in sdk.__all__:
        return getattr(sdk, name)
    raise AttributeError(f"module 'fedtune' has no attribute {name!r}")
