"""The fedtune ClientApp: local LoRA training and held-out evaluation.

The base model and the client's tokenised partition are cached per process, so a
simulation worker (or a long-lived SuperNode process) loads them once and serves
every round and every virtual client it runs. Only adapter tensors and scalar
metrics leave the client.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.config import DataSpec, Scenario, scenario_from_flat
from fedtune.data import ClientData, PackedData, load_clients, pack, pack_texts
from fedtune.flower import messages as keys
from fedtune.model.cache import get_peft_model
from fedtune.model.device import peak_memory_mb, pick_device
from fedtune.model.loading import ModelSpec
from fedtune.model.lora import adapter_state, load_adapter_state, reset_lora
from fedtune.train import EvalResult, evaluate, train_local


@dataclass(frozen=True)
class ClientBatch:
    """One client's tokenised partition: packed training and held-out sequences."""

    client_id: str
    train: torch.Tensor  # [n, seq_len] full packed blocks
    eval: PackedData  # held-out blocks, the last one padded (labels mask the padding)


@functools.lru_cache(maxsize=4)
def _all_clients(data: DataSpec, seed: int) -> tuple[ClientData, ...]:
    return tuple(
        load_clients(
            source=data.source,
            path=data.path or None,
            num_clients=data.num_clients,
            min_lines=data.min_lines,
            eval_fraction=data.eval_fraction,
            seed=seed,
            max_samples_per_client=data.max_samples_per_client or None,
        )
    )


@functools.lru_cache(maxsize=64)
def _tokenised(scenario: Scenario, partition_id: int) -> ClientBatch:
    clients = _all_clients(scenario.data, scenario.run.seed)
    if not 0 <= partition_id < len(clients):
        raise ValueError(
            f"partition-id {partition_id} is out of range: the scenario has {len(clients)} clients"
        )
    client = clients[partition_id]
    _, tokenizer = get_peft_model(scenario.model, scenario.lora, scenario.run.seed)
    seq_len = scenario.data.seq_len
    train = pack_texts(client.train, tokenizer, seq_len)
    held_out = pack(client.eval, tokenizer, seq_len, pad_last=True)
    cap = scenario.data.max_eval_sequences or None
    held_out = PackedData(held_out.input_ids[:cap], held_out.labels[:cap])
    if train.shape[0] == 0:
        raise ValueError(
            f"client {client.client_id} has no full training sequence of {seq_len} tokens; "
            "lower data.seq_len or raise data.min_lines"
        )
    return ClientBatch(client.client_id, train, held_out)


def client_batch(scenario: Scenario, partition_id: int) -> ClientBatch:
    """The packed data of one client (public so tests and evaluators use the same data)."""
    return _tokenised(scenario, partition_id)


def _scenario(bound: Scenario | None, context: Context) -> Scenario:
    return bound if bound is not None else scenario_from_flat(context.run_config)


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError(
            "node_config has no 'partition-id'; start the SuperNode with "
            "--node-config 'partition-id=N num-partitions=M'"
        )
    return int(context.node_config["partition-id"])


def _prepare_model(scenario: Scenario, message: Message) -> tuple[torch.nn.Module, float]:
    """Cached model with the message's adapter loaded (or the seeded init); load seconds."""
    start = time.perf_counter()
    model, _ = get_peft_model(scenario.model, scenario.lora, scenario.run.seed)
    state = keys.record_to_state(message.content.array_records[keys.ADAPTER])
    if state:
        load_adapter_state(model, state)
    else:
        reset_lora(model, scenario.run.seed)
    return model, time.perf_counter() - start


def _device(model_spec: ModelSpec) -> torch.device:
    return pick_device(model_spec.device)


def _use_cpu_share(scenario: Scenario) -> None:
    """One torch thread per CPU the engine gave this client (oversubscription is slow)."""
    torch.set_num_threads(max(1, int(scenario.simulation.cpus_per_client)))


def evaluate_client(model: torch.nn.Module, scenario: Scenario, partition_id: int) -> EvalResult:
    """Held-out loss of ``model`` on one client's data (the number the server reports)."""
    held_out = client_batch(scenario, partition_id).eval
    return evaluate(model, held_out.input_ids, scenario.train.batch_size,
                    _device(scenario.model), labels=held_out.labels)


def train_message(scenario: Scenario, message: Message, context: Context) -> Message:
    """Handle one train message: load payload, train locally, reply with the adapter."""
    partition = _partition_id(context)
    _use_cpu_share(scenario)
    model, load_s = _prepare_model(scenario, message)
    data = client_batch(scenario, partition)
    config = message.content.config_records[keys.CONFIG]
    round_seed = int(config.get(keys.SEED, scenario.run.seed)) * 100_003 + partition
    result = train_local(model, data.train, scenario.train, round_seed, _device(scenario.model))
    codec_start = time.perf_counter()
    adapter = keys.state_to_record(adapter_state(model))
    codec_s = time.perf_counter() - codec_start
    metrics = {
        keys.NUM_EXAMPLES: int(data.train.shape[0]),
        keys.TRAIN_LOSS: float(result.loss),
        keys.LORA_SCALE: float(scenario.lora.scale),
        keys.PARTITION: partition,
        keys.SECONDS_LOAD: load_s,
        keys.SECONDS_TRAIN: float(result.seconds),
        keys.SECONDS_CODEC: codec_s,
        keys.PEAK_MEMORY_MB: peak_memory_mb(_device(scenario.model)),
    }
    return keys.reply(message, metrics, adapter)


def evaluate_message(scenario: Scenario, message: Message, context: Context) -> Message:
    """Handle one evaluate message: held-out loss of the received global adapter."""
    partition = _partition_id(context)
    _use_cpu_share(scenario)
    model, _ = _prepare_model(scenario, message)
    start = time.perf_counter()
    result = evaluate_client(model, scenario, partition)
    metrics = {
        keys.NUM_EXAMPLES: int(client_batch(scenario, partition).eval.input_ids.shape[0]),
        keys.EVAL_LOSS: float(result.loss),
        keys.EVAL_TOKENS: int(result.tokens),
        keys.PARTITION: partition,
        keys.SECONDS_EVAL: time.perf_counter() - start,
    }
    return keys.reply(message, metrics)


def make_client_app(scenario: Scenario | None = None) -> ClientApp:
    """A ClientApp bound to ``scenario``, or reading it from the run config when None."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_message(_scenario(scenario, context), message, context)

    @app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        return evaluate_message(_scenario(scenario, context), message, context)

    return app


app = make_client_app()

__all__ = ["app", "client_batch", "evaluate_client", "make_client_app"]
