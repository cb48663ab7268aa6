"""fedtune: federated and edge fine-tuning of language models with quantized LoRA adapters."""

import os as _os

# No network here and no phoning home by default: Flower's update check and telemetry.
_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
_os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
_os.environ.setdefault("RAY_DEDUP_LOGS", "0")

__version__ = "0.1.0"
