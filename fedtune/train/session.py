"""One client training session: prepare the model, train, prune, privatise, compress.

Every path that trains a LoRA on local data runs this session: the ClientApp (it decodes a
train message into the session's inputs and encodes its result into the reply),
compare's centralised and local baselines, and the SDK's local training. So the model is
prepared the same way (the per-process cached base, the shared seeded LoRA init, the
payload placed as the aggregator's mode says) and trained by the same call everywhere,
and only the inputs differ. Nothing here knows about Flower.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedtune.aggregation.fedsb import latent_key
from fedtune.aggregation.start import client_start
from fedtune.config import LoraSpec, ModelSpec, Scenario, TrainConfig
from fedtune.core.compress import CompressionSpec
from fedtune.data.tokenize import PackedData
from fedtune.model.cache import get_peft_model
from fedtune.model.device import pick_device
from fedtune.model.loading import LENT_PREFIX
from fedtune.model.lora import (
    activate,
    adapter_name,
    adapter_state,
    install_latent,
    latent_R,
    load_adapter_state,
    load_frozen_global,
    reset_lora,
    uninstall_latent,
)
from fedtune.planning.client_settings import ClientSettings
from fedtune.privacy import epsilon_after
from fedtune.train.dpsgd import SampleLevelDP, sample_rate, train_local_dpsgd
from fedtune.train.local import TrainResult, train_local
from fedtune.train.upload import ClientDP, State, compressed_update, privatize, prune_rank

if TYPE_CHECKING:  # peft comes in through fedtune.model (see fedtune.model.imports)
    from peft import PeftModel

#: one DP-SGD round in a client's accountant history: (noise multiplier, sample rate, steps)
DpSgdRound = tuple[float, float, int]


@dataclass(frozen=True)
class Trainee:
    """Who trains: the base (with its quantization), the LoRA, the optimiser settings, and
    the run seed every client's LoRA init is drawn from."""

    model: ModelSpec
    lora: LoraSpec
    train: TrainConfig
    init_seed: int

    @classmethod
    def of(cls, scenario: Scenario, settings: ClientSettings | None = None) -> Trainee:
        """One client of ``scenario`` (its own rank, alpha, quantization, batch size), or
        without settings the scenario's own sections (the centralised baseline)."""
        if settings is None:
            return cls(scenario.model, scenario.lora, scenario.train, scenario.run.seed)
        return cls(settings.model_spec(scenario.model), settings.lora_spec(scenario.lora),
                   settings.train_config(scenario.train), scenario.run.seed)

    @property
    def device(self) -> torch.device:
        return pick_device(self.model.device)

    @property
    def train_device(self) -> torch.device | None:
        """The spec's device; a lent model (``register_model``) is used where the
        application put it (None: the device of its parameters)."""
        return None if self.model.source.startswith(LENT_PREFIX) else self.device

    def cached_model(self) -> tuple[PeftModel, Any]:
        """The per-process cached base with this LoRA active, and its tokenizer."""
        return get_peft_model(self.model, self.lora, self.init_seed)


@dataclass(frozen=True)
class DpSgd:
    """Sample-level DP-SGD, and how the client accounts for it."""

    dp: SampleLevelDP
    delta: float
    accountant: str = "rdp"


@dataclass(frozen=True)
class Orders:
    """What the server asks of this round; the defaults train plainly and send the LoRA."""

    mode: str = "continue"  # "continue" | "residual" (see fedtune.aggregation.start)
    init: str = "fresh"  # residual mode: "fresh" LoRA, or start from the "global" top
    freeze_A: bool = False
    prune_gamma: float = 0.0  # > 0: HetLoRA rank self-pruning
    upload: CompressionSpec = field(default_factory=CompressionSpec)
    error_feedback: bool = True
    product_selection: bool = False
    rounded_start: bool = False  # the payload came compressed: send the update
    client_dp: ClientDP | None = None
    dpsgd: DpSgd | None = None
    #: DP-SGD batches and noise from the seed, an experiment run (ClientDP has its own
    #: flag); otherwise from OS entropy
    reproducible: bool = False


@dataclass
class Kept:
    """What the client keeps between rounds and never sends."""

    residual: State = field(default_factory=dict)  # error feedback of compressed uploads
    dpsgd_history: list[DpSgdRound] = field(default_factory=list)


@dataclass
class Upload:
    """What goes back: the LoRA itself (``state``) or its compressed update (``blob``)."""

    state: State | None = None
    blob: torch.Tensor | None = None
    update_norm: float | None = None  # distributed DP: the update's norm before clipping
    residual_norm_in: float | None = None  # error feedback carried into this upload
    residual: State | None = None  # error feedback to keep (None: leave what is kept)


@dataclass
class SessionResult:
    """One session's outcome, plain values only."""

    upload: Upload
    train: TrainResult
    num_examples: int
    seconds_load: float
    seconds_codec: float
    sample_epsilon: float | None = None  # DP-SGD: this client's epsilon so far
    dpsgd_history: list[DpSgdRound] | None = None  # DP-SGD: the history to keep


class TrainingSession:
    """One client's session: ``run`` does it all; ``prepare`` / ``train`` / ``upload``
    are its steps, for a caller that does something between them (evaluate, save)."""

    def __init__(self, trainee: Trainee, seed: int, payload: State | None = None,
                 orders: Orders | None = None, kept: Kept | None = None) -> None:
        self.trainee = trainee
        self.seed = seed  # this client's seed this round: batch order, dropout, DP noise
        self.payload = payload or {}
        self.orders = orders or Orders()
        self.kept = kept or Kept()
        self.model: PeftModel | None = None
        self.tokenizer: Any = None
        self.start: State = {}
        self.seconds_load = 0.0
        self.sample_epsilon: float | None = None
        self.dpsgd_history: list[DpSgdRound] | None = None

    def prepare(self) -> PeftModel:
        """The cached model set up as the server asked (see ``client_start``); keeps the
        trainable LoRA's starting state, from which the update is measured."""
        began = time.perf_counter()
        model, self.tokenizer = self.trainee.cached_model()
        lora = self.trainee.lora
        uninstall_latent(model)  # left by a Fed-SB session that failed part-way
        reset_lora(model, self.trainee.init_seed)
        trainable, frozen = client_start(self.orders.mode, self.orders.init, self.payload,
                                         adapter_state(model), lora.scale, lora.rank)
        load_adapter_state(model, trainable)
        if frozen:
            load_frozen_global(model, frozen, lora)
        activate(model, adapter_name(lora), with_global=bool(frozen),
                 freeze_A=self.orders.freeze_A)
        if self.orders.mode == "latent":
            self._check_latent_orders()
            install_latent(model, self.trainee.init_seed)
        self.model, self.start = model, trainable
        self.seconds_load = time.perf_counter() - began
        return model

    def train(self, data: PackedData | torch.Tensor,
              on_step: Callable[[int, float], None] | None = None) -> TrainResult:
        """``train_local`` on the packed blocks (a tensor: full blocks of running text), or
        DP-SGD when ordered (which reports no steps: it runs under Opacus' hooks)."""
        if self.model is None:
            raise RuntimeError("TrainingSession.train before prepare: no model to train")
        if isinstance(data, torch.Tensor):
            data = PackedData.blocks(data)
        if self.orders.dpsgd is not None:
            return self._train_dpsgd(data, self.orders.dpsgd)
        return train_local(self.model, data.input_ids, self.trainee.train, self.seed,
                           self.trainee.train_device, labels=data.labels, on_step=on_step,
                           position_ids=data.position_ids)

    def _train_dpsgd(self, data: PackedData, dpsgd: DpSgd) -> TrainResult:
        """DP-SGD, and the client's epsilon after it (its own accountant history)."""
        config = self.trainee.train
        result = train_local_dpsgd(self.model, data.input_ids, config, dpsgd.dp, self.seed,
                                   self.trainee.train_device,
                                   reproducible=self.orders.reproducible,
                                   labels=data.labels, position_ids=data.position_ids)
        rate = sample_rate(config.batch_size * config.grad_accum, len(data))
        history = [*self.kept.dpsgd_history, (dpsgd.dp.noise_multiplier, rate, config.steps)]
        self.dpsgd_history = history
        self.sample_epsilon = epsilon_after(history, dpsgd.delta, dpsgd.accountant)
        return result

    def upload(self, state: State) -> Upload:
        """The trained LoRA made ready to leave: self-pruned, privatised, compressed, as
        ordered. After a compressed download the client holds a rounded copy of the
        global, so it sends its update, which the server adds to its exact copy."""
        orders = self.orders
        if orders.mode == "latent":
            return self._latent_upload()
        if orders.prune_gamma > 0.0:
            state = prune_rank(state, self.trainee.lora.scale, orders.prune_gamma)
        update_norm = None
        if orders.client_dp is not None:
            state, update_norm = privatize(state, self.start, orders.client_dp, self.seed)
        if orders.upload.is_identity and not orders.rounded_start:
            return Upload(state=state, update_norm=update_norm)
        blob, residual, carried = compressed_update(
            state, self.start, orders.upload, self.kept.residual, orders.error_feedback,
            orders.product_selection)
        return Upload(blob=blob, update_norm=update_norm, residual_norm_in=carried,
                      residual=residual if orders.error_feedback else None)

    def _check_latent_orders(self) -> None:
        """Fed-SB trains and sends R only; what would change another LoRA does not apply."""
        orders = self.orders
        asked = {"prune_gamma > 0": orders.prune_gamma > 0.0,
                 "client-level DP": orders.client_dp is not None,
                 "DP-SGD": orders.dpsgd is not None,
                 "upload compression": not orders.upload.is_identity}
        unsupported = [name for name, on in asked.items() if on]
        if unsupported:
            raise ValueError(f"client mode 'latent' (fedsb) cannot serve {unsupported}: its "
                             "upload is one r x r matrix per module")

    def _latent_upload(self) -> Upload:
        """Fed-SB: each module's trained R, r^2 numbers, is all that leaves (the server adds
        B_0 R to the start it sent); the model gets its plain LoRA layers back."""
        R = latent_R(self.model)
        uninstall_latent(self.model)
        return Upload(state={latent_key(module): r for module, r in R.items()})

    def run(self, data: PackedData | torch.Tensor,
            on_step: Callable[[int, float], None] | None = None) -> SessionResult:
        """Prepare, train on ``data`` ([n, seq_len] packed blocks), and make the upload."""
        self.prepare()
        trained = self.train(data, on_step)
        began = time.perf_counter()
        upload = self.upload(adapter_state(self.model))
        return SessionResult(upload, trained, len(data), self.seconds_load,
                             time.perf_counter() - began, self.sample_epsilon,
                             self.dpsgd_history)
