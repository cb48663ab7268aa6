"""Suite-wide settings."""

import os

import torch

# Tiny models on a 2-core machine: one torch thread is ~100x faster than two fighting
# over the cores (measured on tiny-Llama forward/backward).
torch.set_num_threads(1)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
