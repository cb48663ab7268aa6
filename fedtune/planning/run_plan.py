"""What a simulation would do, without running it (``fedtune plan``).

Everything here is computed from the scenario, the model's config (no weights) and the
clients' texts (no tokenizer): each client's settings (``client_settings``), its memory
estimate (``fedtune.model.memory.estimate``) against its profile's budget, the data it
holds, the bytes of a round each way, the planned client-level epsilon and the device
that trains. The bytes are what the run records (``bytes_down`` / ``bytes_up`` of a
round): the size of each record as Flower counts it (per array: its key and its ``.npy``
serialisation), of tensors of the shapes the client trains, encoded with the scenario's
compression (``fedtune.core.compress``).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fedtune.aggregation import get_aggregator
from fedtune.aggregation.base import Aggregator
from fedtune.config import Scenario
from fedtune.core.codec import A_SUFFIX, B_SUFFIX
from fedtune.core.compress import CompressionSpec, encode_state
from fedtune.model.memory import MemoryEstimate, adapted_modules, estimate, model_dims
from fedtune.planning.client_settings import ClientSettings, client_settings

#: peft's prefix of a LoRA key (``base_model.model.<module path>.lora_A.weight``): the key
#: names travel, and Flower counts their length in a record's size
PEFT_PREFIX = "base_model.model."
#: the key of a compressed record's one array (``fedtune.flower.messages.PACKED``; this
#: package sits below the Flower layer, so the test of this module checks they agree)
PACKED_KEY = "fedtune.packed"


@dataclass(frozen=True)
class ClientPlan:
    """One client (partition) of the run: what it trains with, needs, holds and sends."""

    partition: int
    client: str
    profile: str
    rank: int
    alpha: float
    quantization: str
    batch_size: int
    seq_len: int
    #: where its memory is estimated: its profile's device, else the run's training device
    memory_device: str
    memory_mb: float
    #: its profile's memory budget; None without a profile
    budget_mb: float | None
    train_texts: int
    eval_texts: int
    #: a train message from round 2 on (round 1 carries no adapter), and its reply;
    #: None where not estimated (see ``RunPlan.notes``)
    bytes_down: int | None
    bytes_up: int | None

    @property
    def fits(self) -> bool | None:
        return None if self.budget_mb is None else self.memory_mb <= self.budget_mb


@dataclass(frozen=True)
class RunPlan:
    name: str
    model: str
    rounds: int
    aggregator: str
    clients_per_round: int
    device: str
    device_reason: str
    clients: tuple[ClientPlan, ...]
    #: client-level DP: noise multiplier, sample rate, delta, planned epsilon; else None
    privacy: dict[str, float] | None
    notes: tuple[str, ...] = ()

    @property
    def everyone_each_round(self) -> bool:
        return self.clients_per_round == len(self.clients)

    def round_bytes(self, direction: str) -> int | None:
        """A round's total from round 2 on, when every client takes part in every round
        and each size is known (with sampling the total depends on who is drawn)."""
        sizes = [getattr(c, f"bytes_{direction}") for c in self.clients]
        if not self.everyone_each_round or None in sizes:
            return None
        return sum(sizes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for client, plan in zip(out["clients"], self.clients, strict=True):
            client["fits"] = plan.fits
        out["round_bytes_down"] = self.round_bytes("down")
        out["round_bytes_up"] = self.round_bytes("up")
        out["round_1_bytes_down"] = 0
        return out


# --------------------------------------------------------------------------- the device


def training_device(scenario: Scenario) -> tuple[str, str]:
    """(the device the simulated clients train on, why): the GPU share ``fedtune
    simulate`` gives them (``fedtune.planning.gpu_share``)."""
    from fedtune.planning.gpu_share import simulation_device

    share, device = simulation_device(scenario)
    if device["trains_on"] == "cuda" and not torch.cuda.is_available():
        return "unavailable", (f"simulation.gpus_per_client = {share:g} but CUDA is not "
                               "available here")
    if device["trains_on"] == "cuda":
        return "cuda", f"{device['why']}: {share:g} GPU per client"
    return device["trains_on"], device["why"]


# --------------------------------------------------------------------------- the bytes


def _npy_bytes(shape: tuple[int, ...], dtype: type = np.float32) -> int:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype=dtype), allow_pickle=False)
    return len(buffer.getvalue())


def lora_shapes(scenario: Scenario, rank: int) -> dict[str, tuple[int, int]]:
    """peft key -> shape of every LoRA tensor a client of ``rank`` trains."""
    dims = model_dims(scenario.model.source)
    shapes = {}
    for path, (size_in, size_out) in adapted_modules(dims, scenario.lora.target_modules).items():
        shapes[PEFT_PREFIX + path + A_SUFFIX] = (rank, size_in)
        shapes[PEFT_PREFIX + path + B_SUFFIX] = (size_out, rank)
    return shapes


def record_bytes(shapes: dict[str, tuple[int, int]], spec: CompressionSpec) -> int:
    """Bytes of the record carrying tensors of these shapes, as the run counts them: one
    fp32 array per tensor, or (compressed) one packed uint8 blob."""
    if spec.is_identity:
        return sum(len(key) + _npy_bytes(shape) for key, shape in shapes.items())
    generator = torch.Generator().manual_seed(0)  # entries all non-zero: top-k keeps k
    state = {key: torch.rand(shape, generator=generator) + 0.5 for key, shape in shapes.items()}
    blob = encode_state(state, spec)
    return len(PACKED_KEY) + _npy_bytes((len(blob),), np.uint8)


def _download_rank(scenario: Scenario, rank: int) -> int | None:
    """The rank of what a client downloads: its own where the aggregator slices the
    global adapter to it, or where every client (and so the global adapter) has one
    rank; otherwise the global adapter's (not estimated here)."""
    aggregator = get_aggregator(scenario.federation.aggregator,
                                **scenario.federation.aggregator_options())
    if type(aggregator).payload_for is not Aggregator.payload_for:
        return rank
    if not aggregator.capabilities.mixed_ranks:
        return rank
    return None


def _traffic(scenario: Scenario, settings: ClientSettings) -> tuple[int | None, int | None]:
    if scenario.privacy.secure_aggregation:
        return None, None
    compression = scenario.compression
    down_rank = _download_rank(scenario, settings.rank)
    down = (None if down_rank is None
            else record_bytes(lora_shapes(scenario, down_rank), compression.download()))
    up = record_bytes(lora_shapes(scenario, settings.rank), compression.upload())
    return down, up


# --------------------------------------------------------------------------- the plan


def _memory(scenario: Scenario, settings: ClientSettings, device: str) -> MemoryEstimate:
    return estimate(model_dims(scenario.model.source), settings.quantization, settings.rank,
                    scenario.lora.target_modules, settings.batch_size, settings.seq_len,
                    device=device)  # type: ignore[arg-type]


def _privacy(scenario: Scenario) -> dict[str, float] | None:
    if not scenario.privacy.client_level:
        return None
    plan = scenario.privacy_plan()
    return {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
            "rounds": plan.rounds, "delta": scenario.privacy.delta,
            "planned_epsilon": plan.planned_epsilon}


def _notes(scenario: Scenario, clients: list[ClientPlan]) -> tuple[str, ...]:
    notes = []
    if scenario.privacy.secure_aggregation:
        notes.append("secure aggregation: updates travel as masked vectors over several "
                     "stages; their bytes are not estimated here")
    elif any(c.bytes_down is None for c in clients):
        notes.append(f"{scenario.federation.aggregator} sends every client the whole global "
                     "adapter, whose rank this plan does not know: download not estimated")
    if scenario.compression.upload_density < 1 and scenario.compression.selection == "product":
        notes.append("compression.selection = 'product': the split of sent entries between "
                     "A and B varies, so the upload size is approximate")
    if scenario.privacy.sample_noise_multiplier > 0:
        notes.append("DP-SGD: each client's sample-level epsilon depends on its number of "
                     "training sequences; the run reports it every round")
    return tuple(notes)


def plan_run(scenario: Scenario) -> RunPlan:
    """The plan of a simulation of ``scenario``; a ``ConfigError`` (or ``DataError``)
    for what would stop the run before it starts."""
    from fedtune.data import clients_of
    from fedtune.planning.profiles import load_profile

    settings = client_settings(scenario)
    data = clients_of(scenario.data, scenario.run.seed)
    device, reason = training_device(scenario)
    clients = []
    for setting in settings:
        profile = load_profile(setting.profile) if setting.profile else None
        memory_device = profile.device if profile else ("cuda" if device == "cuda" else "cpu")
        held = data[setting.partition]
        down, up = _traffic(scenario, setting)
        clients.append(ClientPlan(
            partition=setting.partition, client=held.client_id, profile=setting.profile,
            rank=setting.rank, alpha=setting.alpha, quantization=setting.quantization,
            batch_size=setting.batch_size, seq_len=setting.seq_len,
            memory_device=memory_device,
            memory_mb=_memory(scenario, setting, memory_device).total_mb,
            budget_mb=None if profile is None else float(profile.memory_budget_mb),
            train_texts=len(held.train), eval_texts=len(held.eval),
            bytes_down=down, bytes_up=up))
    return RunPlan(name=scenario.run.name, model=scenario.model.source,
                   rounds=scenario.run.rounds, aggregator=scenario.federation.aggregator,
                   clients_per_round=scenario.sampled_per_round, device=device,
                   device_reason=reason, clients=tuple(clients), privacy=_privacy(scenario),
                   notes=_notes(scenario, clients))
