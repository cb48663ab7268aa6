"""Message keys and the Flower wire format, in one place.

A train or evaluate message carries:
  ``adapter`` (ArrayRecord): LoRA tensors under their peft key names, fp32; empty in
      the first round, when every client starts from the same seeded initialisation.
  ``config``  (ConfigRecord): round number and per-node settings.
A reply carries ``adapter`` (train only) and ``metrics`` (MetricRecord).
A query message (before round 1) asks a node which client (partition) it is.

Scales: a train payload in "continue" mode is expressed at the client's own LoRA scale
(alpha / r) and loaded as its trainable adapter; in "residual" mode (flora) it is the
global adapter at scale 1 (``B @ A`` is the update), applied frozen. An evaluate payload is
always the global adapter at scale 1, exactly the tensors that are exported.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.core.adapters import LoraFactors
from fedtune.core.codec import factors_from_state_dict, state_dict_from_factors

ADAPTER = "adapter"
CONFIG = "config"
METRICS = "metrics"

# config keys (server -> client); the client's settings travel as "client.*" keys
ROUND = "round"
SEED = "seed"
MODE = "mode"  # "continue" | "residual" (see fedtune.aggregation.base.Aggregator)
FREEZE_A = "freeze-a"
INIT = "init"  # residual mode: "fresh" local LoRA, or start from the "global" top
PRUNE_GAMMA = "prune-gamma"  # hetlora: the client may shrink its rank (self-pruning)

# metric keys (client -> server)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
EVAL_TOKENS = "eval-tokens"
PARTITION = "partition-id"
SECONDS_LOAD = "seconds-load"
SECONDS_TRAIN = "seconds-train"
SECONDS_CODEC = "seconds-codec"
SECONDS_EVAL = "seconds-eval"
PEAK_MEMORY_MB = "peak-memory-mb"


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """peft-keyed fp32 tensors -> ArrayRecord (key names preserved)."""
    return ArrayRecord({k: v.detach().to(torch.float32).cpu() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> peft-keyed tensors (exact inverse of :func:`state_to_record`)."""
    return dict(record.to_torch_state_dict())


def factors_to_record(factors: Mapping[str, LoraFactors]) -> ArrayRecord:
    return state_to_record(state_dict_from_factors(factors))


def record_to_factors(record: ArrayRecord, scale: float) -> dict[str, LoraFactors]:
    return factors_from_state_dict(record_to_state(record), scale)


def record_nbytes(record: ArrayRecord) -> int:
    """Serialised size of an ArrayRecord's arrays (what actually travels)."""
    return int(record.count_bytes())


def make_content(
    adapter: ArrayRecord | None, config: Mapping[str, object] | None = None
) -> RecordDict:
    content = RecordDict({ADAPTER: adapter if adapter is not None else ArrayRecord()})
    if config is not None:
        content[CONFIG] = ConfigRecord(dict(config))
    return content


def reply(message: Message, metrics: Mapping[str, float], adapter: ArrayRecord | None = None
          ) -> Message:
    """Build the reply to ``message`` with metrics and optionally an adapter."""
    content = RecordDict({METRICS: MetricRecord(dict(metrics))})
    if adapter is not None:
        content[ADAPTER] = adapter
    return Message(content=content, reply_to=message)
