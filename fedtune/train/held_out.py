"""The federation's held-out loss of one client, defined once for the ClientApp's evaluate
handler, compare's baselines and the tests."""

from __future__ import annotations

import torch

from fedtune.config import Scenario
from fedtune.data import PackedData
from fedtune.model.lora import GLOBAL_ADAPTER, load_frozen_global
from fedtune.planning.client_settings import ClientSettings
from fedtune.train.batches import client_batch
from fedtune.train.evaluate import EvalResult, evaluate
from fedtune.train.session import Trainee


def evaluate_client(model: torch.nn.Module, scenario: Scenario, partition_id: int,
                    seq_len: int | None = None, batch_size: int | None = None,
                    held_out: PackedData | None = None) -> EvalResult:
    """Held-out loss of ``model`` on one client's data: ``held_out`` when given (a
    deployed client's own file), else its simulated partition's."""
    if held_out is None:
        held_out = client_batch(scenario, partition_id, seq_len).eval
    return evaluate(model, held_out.input_ids, batch_size or scenario.train.batch_size,
                    Trainee.of(scenario).device, labels=held_out.labels,
                    position_ids=held_out.position_ids)


def evaluate_global(scenario: Scenario, settings: ClientSettings,
                    state: dict[str, torch.Tensor], held_out: PackedData | None = None
                    ) -> EvalResult:
    """Held-out loss of one client under a global adapter (scale 1, applied frozen on the
    client's own base) or, with an empty state, of the bare base model. The one place that
    defines what "the federation's held-out loss" means."""
    trainee = Trainee.of(scenario, settings)
    model, _ = trainee.cached_model()
    if not state:
        with model.disable_adapter():
            return evaluate_client(model, scenario, settings.partition, settings.seq_len,
                                   settings.batch_size, held_out)
    load_frozen_global(model, state, trainee.lora)
    model.base_model.set_adapter([GLOBAL_ADAPTER])
    return evaluate_client(model, scenario, settings.partition, settings.seq_len,
                           settings.batch_size, held_out)
