"""The fedtune ClientApp: local LoRA training and held-out evaluation.

The base model and the client's tokenised partition are cached per process, so a
simulation worker (or a long-lived SuperNode process) loads them once and serves
every round and every virtual client it runs. Only adapter tensors and scalar
metrics leave the client.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from peft import PeftModel

from fedtune.aggregation.hetlora import self_prune_rank
from fedtune.aggregation.start import client_start, sliced_like
from fedtune.config import DataSpec, Scenario, scenario_from_flat
from fedtune.core.codec import A_SUFFIX, B_SUFFIX, factors_from_state_dict
from fedtune.core.compress import CompressionSpec, compress_with_feedback, product_positions
from fedtune.core.seeds import client_noise_seed, client_seed
from fedtune.data import ClientData, PackedData, clients_of, pack, pack_texts
from fedtune.flower import messages as keys
from fedtune.flower import ray_nodes
from fedtune.model.cache import get_peft_model
from fedtune.model.device import peak_memory_mb, pick_device
from fedtune.model.loading import ModelSpec, load_tokenizer
from fedtune.model.lora import (
    GLOBAL_ADAPTER,
    LoraSpec,
    activate,
    adapter_name,
    adapter_state,
    load_adapter_state,
    load_frozen_global,
    reset_lora,
)
from fedtune.planning.client_settings import ClientSettings
from fedtune.privacy import GaussianNoise, epsilon_after
from fedtune.privacy.mechanism import local_release
from fedtune.train import EvalResult, TrainResult, evaluate, train_local


@dataclass(frozen=True)
class ClientBatch:
    """One client's tokenised partition: packed training and held-out sequences."""

    client_id: str
    train: torch.Tensor  # [n, seq_len] full packed blocks
    eval: PackedData  # held-out blocks, the last one padded (labels mask the padding)


@functools.lru_cache(maxsize=4)
def _all_clients(data: DataSpec, seed: int) -> tuple[ClientData, ...]:
    return tuple(clients_of(data, seed))


@functools.lru_cache(maxsize=1024)
def _tokenised(data: DataSpec, seed: int, source: str, partition_id: int, seq_len: int
               ) -> ClientBatch:
    """Keyed on what the data depends on only, so other scenario keys never re-tokenise."""
    clients = _all_clients(data, seed)
    if not 0 <= partition_id < len(clients):
        raise ValueError(
            f"partition-id {partition_id} is out of range: the scenario has {len(clients)} clients"
        )
    return _pack_client(clients[partition_id], source, seq_len, data.max_eval_sequences)


def _pack_client(client: ClientData, source: str, seq_len: int, max_eval: int) -> ClientBatch:
    tokenizer = _tokenizer(source)
    train = pack_texts(client.train, tokenizer, seq_len)
    held_out = pack(client.eval, tokenizer, seq_len, pad_last=True)
    cap = max_eval or None
    held_out = PackedData(held_out.input_ids[:cap], held_out.labels[:cap])
    if train.shape[0] == 0:
        raise ValueError(
            f"client {client.client_id} has no full training sequence of {seq_len} tokens; "
            "lower data.seq_len or raise data.min_lines"
        )
    return ClientBatch(client.client_id, train, held_out)


def client_batch(scenario: Scenario, partition_id: int, seq_len: int | None = None
                 ) -> ClientBatch:
    """The packed data of one client (public so tests and evaluators use the same data)."""
    return _tokenised(scenario.data, scenario.run.seed, scenario.model.source, partition_id,
                      seq_len or scenario.data.seq_len)


@functools.lru_cache(maxsize=8)
def _local_tokenised(path: str, name: str, data: DataSpec, seed: int, source: str,
                     seq_len: int) -> ClientBatch:
    """A deployed client's own file, tokenised once per process (see ``load_local``)."""
    from fedtune.data.local import load_local

    client = load_local(path, name, data.eval_fraction, seed, data.max_samples_per_client or None)
    return _pack_client(client, source, seq_len, data.max_eval_sequences)


def _node_batch(scenario: Scenario, context: Context, partition_id: int,
                seq_len: int | None = None) -> ClientBatch:
    """This node's data: its own file when deployed, else its simulated partition."""
    config = context.node_config
    if DATA_PATH in config:
        return _local_tokenised(str(config[DATA_PATH]), str(config.get(NAME, "client")),
                                scenario.data, scenario.run.seed, scenario.model.source,
                                seq_len or scenario.data.seq_len)
    return client_batch(scenario, partition_id, seq_len)


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str) -> Any:
    """One tokenizer per process (quantization does not change it)."""
    return load_tokenizer(source)


def _scenario(bound: Scenario | None, context: Context) -> Scenario:
    """The run's scenario; a node that brings its own copy of the base (node_config
    ``model``) trains that one, once it is known to be the federation's base."""
    scenario = bound if bound is not None else scenario_from_flat(context.run_config)
    own = str(context.node_config.get(MODEL, ""))
    if not own or own == scenario.model.source:
        return scenario
    _check_own_base(own, scenario.model.source, scenario.lora.target_modules)
    return dataclasses.replace(scenario, model=dataclasses.replace(scenario.model, source=own))


@functools.lru_cache(maxsize=8)
def _check_own_base(own: str, base: str, targets: tuple[str, ...]) -> None:
    from fedtune.model.compat import check_compatible

    check_compatible(own, base, targets)


#: node_config keys of a deployed client (``fedtune client`` / the SDK set them)
DATA_PATH, NAME, PROFILE, MODEL = "data-path", "name", "profile", "model"

#: what an embedding application hears from the ClientApp (see ``make_client_app``):
#: ``(event, server round, details)``; an exception it raises ends the message's work
Listener = Callable[[str, int, dict[str, Any]], None]


def _quiet(event: str, server_round: int, details: dict[str, Any]) -> None:
    """The listener of a ClientApp nobody listens to."""


def _deployed(context: Context) -> bool:
    return DATA_PATH in context.node_config


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError(
            "node_config has no 'partition-id'; start the SuperNode with "
            "--node-config 'partition-id=N num-partitions=M' (or use `fedtune client`)"
        )
    return int(context.node_config["partition-id"])


def _settings(message: Message, context: Context) -> ClientSettings:
    settings = ClientSettings.from_config(message.content.config_records[keys.CONFIG])
    if _deployed(context):  # the server placed this client by its name
        return settings
    if settings.partition != _partition_id(context):
        raise ValueError(f"settings for partition {settings.partition} sent to partition "
                         f"{_partition_id(context)}")
    return settings


def _model(scenario: Scenario, settings: ClientSettings) -> tuple[PeftModel, LoraSpec]:
    """The cached base (this client's quantization) with this client's LoRA active."""
    lora = settings.lora_spec(scenario.lora)
    model, _ = get_peft_model(settings.model_spec(scenario.model), lora, scenario.run.seed)
    return model, lora


def _payload(message: Message) -> dict[str, torch.Tensor]:
    return keys.record_to_state(message.content.array_records[keys.ADAPTER])


def _prepare_for_training(scenario: Scenario, settings: ClientSettings, message: Message
                          ) -> tuple[PeftModel, dict[str, torch.Tensor], float]:
    """Cached model set up as the server asked (see ``client_start``); returns it, the
    trainable LoRA's starting state and the set-up seconds."""
    start = time.perf_counter()
    config = message.content.config_records[keys.CONFIG]
    model, lora = _model(scenario, settings)
    reset_lora(model, scenario.run.seed)
    trainable, frozen = client_start(
        config.get(keys.MODE, "continue"), config.get(keys.INIT, "fresh"), _payload(message),
        adapter_state(model), lora.scale, lora.rank)
    load_adapter_state(model, trainable)
    if frozen:
        load_frozen_global(model, frozen, lora)
    activate(model, adapter_name(lora), with_global=bool(frozen),
             freeze_A=bool(config.get(keys.FREEZE_A, False)))
    return model, trainable, time.perf_counter() - start


def _device(model_spec: ModelSpec) -> torch.device:
    return pick_device(model_spec.device)


def _use_cpu_share(scenario: Scenario, context: Context | None = None) -> None:
    """One torch thread per CPU the engine gave this client (oversubscription is slow);
    a deployed client has its machine to itself and keeps torch's default."""
    if context is not None and _deployed(context):
        return
    torch.set_num_threads(max(1, int(scenario.simulation.cpus_per_client)))


def evaluate_client(model: torch.nn.Module, scenario: Scenario, partition_id: int,
                    seq_len: int | None = None, batch_size: int | None = None,
                    context: Context | None = None) -> EvalResult:
    """Held-out loss of ``model`` on one client's data (the number the server reports)."""
    held_out = (client_batch(scenario, partition_id, seq_len) if context is None
                else _node_batch(scenario, context, partition_id, seq_len)).eval
    return evaluate(model, held_out.input_ids, batch_size or scenario.train.batch_size,
                    _device(scenario.model), labels=held_out.labels)


def prune_rank(state: dict[str, torch.Tensor], scale: float, gamma: float
               ) -> dict[str, torch.Tensor]:
    """HetLoRA rank self-pruning: keep the first r' components when the rest carry too
    little of the update (criterion in ``fedtune.aggregation.hetlora.self_prune_rank``)."""
    factors = factors_from_state_dict(state, scale)
    keep = self_prune_rank(factors, gamma)
    rank = next(iter(factors.values())).rank
    if keep >= rank:
        return state
    return {k: (v[:keep] if k.endswith(A_SUFFIX) else v[:, :keep]) for k, v in state.items()}


def upload_spec(config: Any) -> CompressionSpec:
    """How the server asked this round's update to travel (dense fp32 when unsaid)."""
    return CompressionSpec(density=float(config.get(keys.UPLOAD_DENSITY, 1.0)),
                           values=str(config.get(keys.UPLOAD_VALUES, "fp32")),
                           block_size=int(config.get(keys.BLOCK_SIZE, 256)))


def compressed_upload(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                      config: Any, context: Context) -> tuple[Any, dict[str, float]]:
    """The update (final LoRA minus its start) compressed as the server asked, with the
    error-feedback residual kept in the node's own state between rounds (never sent)."""
    spec = upload_spec(config)
    delta = {k: state[k] - begun for k, begun in sliced_like(start, state).items()}
    feedback = bool(config.get(keys.ERROR_FEEDBACK, True))
    kept = context.state.array_records.get(keys.RESIDUAL)
    residual = {} if kept is None else dict(kept.to_torch_state_dict())
    carried = sum(float(r.pow(2).sum()) for k, r in residual.items()
                  if k in delta and r.shape == delta[k].shape) ** 0.5
    select = None
    if config.get(keys.SELECTION, "tensor") == "product":
        select = functools.partial(product_positions, factors=state, density=spec.density)
    blob, residual = compress_with_feedback(delta, residual, spec, feedback, select)
    if feedback:
        context.state[keys.RESIDUAL] = ArrayRecord(residual)
    return keys.blob_to_record(blob), {keys.RESIDUAL_NORM_IN: carried}


def privatize(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], config: Any,
              seed: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Distributed client-level DP: the LoRA moved to start + clipped update + this
    client's share of the noise, on the factors the server's mechanism releases."""
    fields = str(config[keys.DP_FIELDS]).split(",")
    suffixes = tuple(A_SUFFIX if f == "A" else B_SUFFIX for f in fields)
    begun = sliced_like(start, state)
    delta = {k: state[k] - begun[k] for k in state if k.endswith(suffixes)}
    secure = bool(config.get(keys.DP_SECURE, False))
    noise = GaussianNoise(None if secure else client_noise_seed(seed))
    noisy, norm = local_release(delta, float(config[keys.DP_CLIP]),
                                float(config[keys.DP_NOISE_STD]), noise)
    out = {k: begun[k] + noisy[k] if k in noisy else v for k, v in state.items()}
    return out, {keys.DP_UPDATE_NORM: norm}


def train_with_dpsgd(model: PeftModel, data: torch.Tensor, scenario: Scenario,
                     settings: ClientSettings, config: Any, seed: int, context: Context
                     ) -> tuple[TrainResult, dict[str, float]]:
    """DP-SGD training; the client's own accountant history lives in its node state and
    its epsilon so far is reported (only the number leaves the client)."""
    from fedtune.privacy.dpsgd import SampleLevelDP, sample_rate, train_local_dpsgd

    dp = SampleLevelDP(float(config[keys.DPSGD_CLIP]), float(config[keys.DPSGD_NOISE]))
    train_config = settings.train_config(scenario.train)
    result = train_local_dpsgd(model, data, train_config, dp, seed, _device(scenario.model),
                               secure=bool(config.get(keys.DP_SECURE, False)))
    kept = context.state.config_records.get(keys.DPSGD_HISTORY)
    history = [] if kept is None else list(zip(kept["z"], kept["q"], kept["n"], strict=True))
    rate = sample_rate(train_config.batch_size * train_config.grad_accum, data.shape[0])
    history.append((dp.noise_multiplier, rate, train_config.steps))
    context.state[keys.DPSGD_HISTORY] = ConfigRecord(
        {"z": [float(h[0]) for h in history], "q": [float(h[1]) for h in history],
         "n": [int(h[2]) for h in history]})
    epsilon = epsilon_after(history, float(config[keys.DPSGD_DELTA]),
                            str(config[keys.DPSGD_ACCOUNTANT]))
    return result, {keys.SAMPLE_EPSILON: epsilon}


def train_message(scenario: Scenario, message: Message, context: Context,
                  listener: Listener = _quiet) -> Message:
    """Handle one train message: set up the payload, train locally, reply with the LoRA
    (or, when the server asks for compression, with its compressed update)."""
    _use_cpu_share(scenario, context)
    settings = _settings(message, context)
    model, start, setup_s = _prepare_for_training(scenario, settings, message)
    data = _node_batch(scenario, context, settings.partition, settings.seq_len)
    config = message.content.config_records[keys.CONFIG]
    seed = client_seed(int(config[keys.SEED]), settings.partition)
    server_round = int(config.get(keys.ROUND, 0))
    steps = settings.train_config(scenario.train).steps

    def on_step(done: int, loss: float) -> None:
        listener("step", server_round, {"step": done, "steps": steps, "loss": loss})
    extra: dict[str, float] = {}
    if float(config.get(keys.DPSGD_NOISE, 0.0)) > 0:
        result, extra = train_with_dpsgd(model, data.train, scenario, settings, config, seed,
                                         context)
    else:
        result = train_local(model, data.train, settings.train_config(scenario.train), seed,
                             _device(scenario.model), on_step=on_step)
    codec_start = time.perf_counter()
    state = adapter_state(model)
    gamma = float(config.get(keys.PRUNE_GAMMA, 0.0))
    if gamma > 0.0:
        state = prune_rank(state, settings.alpha / settings.rank, gamma)
    if keys.DP_NOISE_STD in config:
        state, dp_metrics = privatize(state, start, config, seed)
        extra.update(dp_metrics)
    # after a compressed download the client holds a rounded copy of the global: send the
    # update, which the server adds to its full-precision copy (dense fp32 if so asked)
    rounded_start = keys.is_packed(message.content.array_records[keys.ADAPTER])
    if upload_spec(config).is_identity and not rounded_start:
        adapter = keys.state_to_record(state)
    else:
        adapter, compression_metrics = compressed_upload(state, start, config, context)
        extra.update(compression_metrics)
    codec_s = time.perf_counter() - codec_start
    metrics = {
        keys.NUM_EXAMPLES: int(data.train.shape[0]),
        keys.TRAIN_LOSS: float(result.loss),
        keys.PARTITION: settings.partition,
        keys.SECONDS_LOAD: setup_s,
        keys.SECONDS_TRAIN: float(result.seconds),
        keys.SECONDS_CODEC: codec_s,
        keys.PEAK_MEMORY_MB: peak_memory_mb(_device(scenario.model)),
        **ray_nodes.node_metrics(),  # which Ray node ran it (nothing when deployed)
        **extra,
    }
    outgoing = keys.reply(message, metrics, adapter)
    listener("train", server_round, metrics)
    return outgoing


def evaluate_global(scenario: Scenario, settings: ClientSettings,
                    state: dict[str, torch.Tensor], context: Context | None = None
                    ) -> EvalResult:
    """Held-out loss of one client under a global adapter (scale 1, applied frozen on the
    client's own base) or, with an empty state, of the bare base model. The one place that
    defines what "the federation's held-out loss" means."""
    model, lora = _model(scenario, settings)
    if not state:
        with model.disable_adapter():
            return evaluate_client(model, scenario, settings.partition, settings.seq_len,
                                   settings.batch_size, context)
    load_frozen_global(model, state, lora)
    model.base_model.set_adapter([GLOBAL_ADAPTER])
    return evaluate_client(model, scenario, settings.partition, settings.seq_len,
                           settings.batch_size, context)


def evaluate_message(scenario: Scenario, message: Message, context: Context,
                     listener: Listener = _quiet) -> Message:
    """Handle one evaluate message: held-out loss of exactly the global adapter."""
    _use_cpu_share(scenario, context)
    settings = _settings(message, context)
    start = time.perf_counter()
    result = evaluate_global(scenario, settings, _payload(message), context)
    held_out = _node_batch(scenario, context, settings.partition, settings.seq_len).eval
    metrics = {
        keys.NUM_EXAMPLES: int(held_out.input_ids.shape[0]),
        keys.EVAL_LOSS: float(result.loss),
        keys.EVAL_TOKENS: int(result.tokens),
        keys.PARTITION: settings.partition,
        keys.SECONDS_EVAL: time.perf_counter() - start,
    }
    server_round = int(message.content.config_records[keys.CONFIG].get(keys.ROUND, 0))
    listener("evaluate", server_round, metrics)
    return keys.reply(message, metrics)


def final_message(message: Message, context: Context, listener: Listener) -> Message:
    """The run is over: hand its final global adapter to the listener (an application
    that embeds fedtune keeps it) and acknowledge."""
    config = message.content.config_records[keys.CONFIG]
    server_round = int(config.get(keys.ROUND, 0))
    listener("final", server_round, {"adapter": _payload(message),
                                     "scenario": scenario_from_flat(context.run_config)})
    return keys.reply(message, {keys.ROUND: server_round})


def query_message(message: Message, context: Context) -> Message:
    """Tell the server which client this node is: its partition in a simulation; its
    name and device profile (the TOML text, so the server can resolve it) when deployed."""
    if not _deployed(context):
        return keys.reply(message, {keys.PARTITION: _partition_id(context)})
    profile = str(context.node_config.get(PROFILE, ""))
    text = ""
    if profile:
        from fedtune.planning.profiles import profile_path

        text = profile_path(profile).read_text()
    return keys.reply(message, {keys.PARTITION: -1},
                      identity={keys.CLIENT_NAME: str(context.node_config.get(NAME, "")),
                                keys.CLIENT_PROFILE: text})


def make_client_app(scenario: Scenario | None = None, listener: Listener = _quiet,
                    mods: list[Any] | None = None) -> ClientApp:
    """A ClientApp bound to ``scenario``, or reading it from the run config when None;
    ``listener`` hears every step, reply and the run's end (see ``Listener``); ``mods``
    are Flower mods around every message."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_message(_scenario(scenario, context), message, context, listener)

    @app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        return evaluate_message(_scenario(scenario, context), message, context, listener)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        config = message.content.config_records.get(keys.CONFIG)
        if config is not None and config.get(keys.FINAL, False):
            return final_message(message, context, listener)
        return query_message(message, context)

    return app


app = make_client_app()

__all__ = ["app", "client_batch", "evaluate_client", "make_client_app"]
