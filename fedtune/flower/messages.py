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

Compression: a compressed adapter travels as ONE uint8 array under ``PACKED`` (the blob
of ``fedtune.core.compress``). Downloads pack the payload itself (dense, fp16 or int8);
uploads pack the client's *update* (its final LoRA minus the LoRA it started from, plus
its error-feedback residual), top-k sparse. The server knows each client's start
(``fedtune.aggregation.start.client_start``) and adds it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.aggregation.fedsb import LATENT_SUFFIX
from fedtune.core.adapters import LoraFactors
from fedtune.core.codec import (
    A_SUFFIX,
    CodecError,
    factors_from_state_dict,
    state_dict_from_factors,
)
from fedtune.core.compress import CompressionSpec, Decoded, decode_state, encode_state

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
UPLOAD_DENSITY = "upload-density"  # top-k fraction of each update tensor; 1 = dense
UPLOAD_VALUES = "upload-values"  # fp32 | fp16 | int8
BLOCK_SIZE = "block-size"  # int8 absmax block
ERROR_FEEDBACK = "error-feedback"  # keep what was not sent and add it to the next update
SELECTION = "upload-selection"  # "tensor" top-k, or "product" (effect on B @ A per module)

# differential privacy (server -> client)
DP_CLIP = "dp-clip-norm"  # distributed client-level DP: clip the update to this norm
DP_NOISE_STD = "dp-noise-std"  # ... and add this client's share of the noise
DP_FIELDS = "dp-fields"  # "A,B" or "B" (ffa): the factors the mechanism releases
DP_SECURE = "dp-secure-noise"  # noise from OS entropy (the client reads its scenario's
#                                 privacy.reproducible: OS entropy unless it is true)
DPSGD_NOISE = "dpsgd-noise-multiplier"  # > 0: train with DP-SGD (sample-level DP)
DPSGD_CLIP = "dpsgd-clip-norm"
DPSGD_DELTA = "dpsgd-delta"
DPSGD_ACCOUNTANT = "dpsgd-accountant"
DPSGD_HISTORY = "fedtune.dpsgd"  # client state: the client's own accountant history

PACKED = "fedtune.packed"  # the one array of a compressed adapter record
RESIDUAL = "fedtune.residual"  # client state: the error-feedback residual

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
RESIDUAL_NORM_IN = "residual-norm-in"  # error feedback carried into this round's upload
DP_UPDATE_NORM = "dp-update-norm"  # distributed DP: the update's norm before clipping
SAMPLE_EPSILON = "sample-epsilon"  # DP-SGD: this client's epsilon so far
RAY_NODE = "ray-node"  # simulation: the Ray node that trained (fedtune.flower.ray_nodes)
RAY_NODE_IP = "ray-node-ip"  # ... and its IPv4 address, as an integer

# deployment: what a `fedtune client` tells the server about itself (query reply)
FINAL = "final"  # query config: the run is over; its adapter is the final global adapter
IDENTITY = "identity"  # ConfigRecord of a query reply
CLIENT_NAME = "client-name"  # stable name: the same client after a restart
CLIENT_PROFILE = "client-profile"  # its device profile as TOML text ("" = server defaults)

#: the only records a client's reply may carry: adapter tensors and scalar metrics (and,
#: in a query reply, the client's name and profile). Nothing else leaves a client.
REPLY_RECORDS = frozenset({ADAPTER, METRICS, IDENTITY})


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """peft-keyed fp32 tensors -> ArrayRecord (key names preserved)."""
    return ArrayRecord({k: v.detach().to(torch.float32).cpu() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> peft-keyed tensors (exact inverse of :func:`state_to_record`; a
    packed record is decoded, entries that were not sent are zero)."""
    return record_to_decoded(record).values


def record_to_decoded(record: ArrayRecord) -> Decoded:
    """Tensors and, for a packed record, the mask of entries actually sent."""
    if is_packed(record):
        if len(record) != 1:
            raise CodecError(f"a packed adapter has one array, this one has {len(record)}")
        return decode_state(record[PACKED].numpy().tobytes())
    values = dict(record.to_torch_state_dict())
    return Decoded(values, dict.fromkeys(values))


def is_packed(record: ArrayRecord) -> bool:
    return PACKED in record


def blob_to_record(blob: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({PACKED: blob})


def encode_record(state: Mapping[str, torch.Tensor], spec: CompressionSpec) -> ArrayRecord:
    """The plain per-tensor fp32 record when ``spec`` compresses nothing, else one blob."""
    if spec.is_identity or not state:
        return state_to_record(state)
    return blob_to_record(encode_state(state, spec))


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


def reply(message: Message, metrics: Mapping[str, float], adapter: ArrayRecord | None = None,
          identity: Mapping[str, str] | None = None, assignment: Assignment | None = None
          ) -> Message:
    """Build the reply to ``message`` with metrics and optionally an adapter (or, for a
    query, the client's identity); see :func:`check_outgoing`."""
    content = RecordDict({METRICS: MetricRecord(dict(metrics))})
    if adapter is not None:
        content[ADAPTER] = adapter
    if identity is not None:
        content[IDENTITY] = ConfigRecord(dict(identity))
    check_outgoing(content, assignment)
    return Message(content=content, reply_to=message)


class PrivacyLeakError(ValueError):
    """A reply was about to carry something other than what the client was asked for."""


@dataclass(frozen=True)
class Assignment:
    """What a train message asked this client to send back, to hold its reply to.

    ``shapes``: the LoRA it trains, key -> shape at the assigned rank (the start it
    trained from); ``pruning``: HetLoRA self-pruning may return a smaller rank;
    ``frozen``: factors the client was told not to train (ffa's A), which must come back
    exactly as they were (unchanged, or a zero update in a packed reply); ``metrics``:
    under client-level DP the only metric names that may leave (None: any number)."""

    shapes: Mapping[str, tuple[int, ...]]
    pruning: bool = False
    frozen: Mapping[str, torch.Tensor] = field(default_factory=dict)
    metrics: frozenset[str] | None = None

    def check_shape(self, key: str, shape: tuple[int, ...]) -> None:
        """``key`` is an assigned tensor and ``shape`` its shape (or, pruning, the same
        factor at a smaller rank)."""
        if key not in self.shapes:
            raise PrivacyLeakError(f"a reply may carry only the assigned LoRA tensors, not "
                                   f"{key!r}")
        want = tuple(self.shapes[key])
        shape = tuple(shape)
        if shape == want:
            return
        rank_at = 0 if key.endswith(A_SUFFIX) else 1
        smaller = (self.pruning and len(shape) == 2 == len(want)
                   and shape[1 - rank_at] == want[1 - rank_at]
                   and 1 <= shape[rank_at] < want[rank_at])
        if not smaller:
            raise PrivacyLeakError(f"{key}: shape {list(shape)} differs from the assigned "
                                   f"{list(want)}")

    def check_adapter(self, record: ArrayRecord) -> None:
        """Every tensor assigned, of its shape, fp32 (or one packed uint8 blob whose
        decoded tensors are), frozen factors untouched."""
        if is_packed(record):
            self._check_packed(record)
            return
        missing = sorted(set(self.shapes) - set(record))
        if missing:
            raise PrivacyLeakError(f"a reply lacks assigned tensors, e.g. {missing[0]!r}")
        for key, array in record.items():
            self.check_shape(key, tuple(array.shape))
            if array.dtype != "float32":
                raise PrivacyLeakError(f"{key}: dtype {array.dtype}, expected float32")
            if key in self.frozen and not torch.equal(
                    torch.from_numpy(array.numpy()), self.frozen[key].to(torch.float32).cpu()):
                raise PrivacyLeakError(f"{key} is frozen but differs from what was received")

    def _check_packed(self, record: ArrayRecord) -> None:
        if len(record) != 1:
            raise PrivacyLeakError(f"a packed adapter has one array, this one has {len(record)}")
        blob = record[PACKED]
        if blob.dtype != "uint8" or len(blob.shape) != 1:
            raise PrivacyLeakError(f"{PACKED}: a {list(blob.shape)} {blob.dtype} array, "
                                   "expected 1-D uint8")
        try:
            decoded = decode_state(blob.numpy().tobytes(), self.check_shape)
        except CodecError as err:
            raise PrivacyLeakError(f"{PACKED} does not decode: {err}") from None
        for key, value in decoded.values.items():
            if key in self.frozen and bool(value.ne(0).any()):
                raise PrivacyLeakError(f"{key} is frozen but the packed update changes it")


def check_outgoing(content: RecordDict, assignment: Assignment | None = None) -> None:
    """The client's last line of defence: only LoRA tensors (or one packed blob) and
    scalar metrics may leave; no text, token ids or per-example values. With the
    ``assignment`` of a train message, each tensor is held to the shape and dtype the
    client was asked for (a packed blob is decoded and checked), and under client-level
    DP the metrics to the few names the assignment allows."""
    extra = sorted(set(content) - REPLY_RECORDS)
    if extra:
        raise PrivacyLeakError(f"a reply may not carry the records {extra}")
    adapter = content.array_records.get(ADAPTER, ArrayRecord())
    for key in adapter:
        lora = ".lora_A." in key or ".lora_B." in key or key.endswith(LATENT_SUFFIX)
        if key != PACKED and not lora:
            raise PrivacyLeakError(f"a reply's adapter may hold LoRA factors (or fedsb's R) "
                                   f"only, not {key!r}")
    if assignment is not None:
        assignment.check_adapter(adapter)
    metrics = content.metric_records.get(METRICS, MetricRecord())
    for key, value in metrics.items():
        if not isinstance(value, (int, float)):
            raise PrivacyLeakError(f"metric {key!r} must be one number, got a list")
    if assignment is not None and assignment.metrics is not None:
        unsent = sorted(set(metrics) - assignment.metrics)
        if unsent:
            raise PrivacyLeakError(f"under DP a reply may not carry the "
                                   f"data-dependent metrics {unsent}")
    identity = content.config_records.get(IDENTITY)
    if identity is not None and set(identity) - {CLIENT_NAME, CLIENT_PROFILE}:
        raise PrivacyLeakError(f"a query reply may carry only {CLIENT_NAME!r} and "
                               f"{CLIENT_PROFILE!r}, got {sorted(identity)}")
