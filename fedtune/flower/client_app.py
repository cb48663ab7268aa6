"""The fedtune ClientApp: Flower's side of a client.

Each handler decodes a Message into plain inputs, calls what does the work
(``fedtune.train.session`` trains, ``fedtune.train.held_out`` evaluates) and encodes the
result into the reply. The base model and the client's tokenised partition are cached
per process, so a simulation worker (or a long-lived SuperNode process) loads them once
and serves every round and every virtual client it runs. Only adapter tensors and scalar
metrics leave the client.

What a client enforces itself, whatever the server asks (docs/privacy.md, "What a client
enforces"): its own privacy floor (a weaker request is refused with a reply that says
why, before any training); under client-level DP, a train reply that carries the update
and nothing data-dependent besides, and no un-noised evaluation unless the scenario
opted into it and the client has no floor; every DP draw from OS entropy unless the run
is a declared reproducible experiment; each tensor of a reply held to the shape and
dtype it was assigned (``messages.Assignment``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedtune.aggregation.fedsb import latent_shapes
from fedtune.config import Scenario, scenario_from_flat
from fedtune.core.compress import CompressionSpec
from fedtune.core.seeds import client_seed
from fedtune.flower import messages as keys
from fedtune.flower import ray_nodes, secagg
from fedtune.model.device import peak_memory_mb
from fedtune.planning.client_settings import ClientSettings
from fedtune.privacy.floor import DPRequest, PrivacyFloor, refusal
from fedtune.privacy.wrapper import DPSettings
from fedtune.train.batches import ClientBatch, client_batch, local_batch
from fedtune.train.dpsgd import SampleLevelDP
from fedtune.train.held_out import evaluate_global
from fedtune.train.session import (
    DpSgd,
    DpSgdRound,
    Kept,
    Orders,
    SessionResult,
    Trainee,
    TrainingSession,
    Upload,
)
from fedtune.train.upload import ClientDP


def _node_batch(scenario: Scenario, context: Context, partition_id: int,
                seq_len: int | None = None) -> ClientBatch:
    """This node's data: its own file when deployed, else its simulated partition."""
    config = context.node_config
    if DATA_PATH in config:
        return local_batch(scenario, str(config[DATA_PATH]), str(config.get(NAME, "client")),
                           seq_len)
    return client_batch(scenario, partition_id, seq_len)


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
#: node state: this node has trained under client-level DP in this run (its evaluation
#: must then not leak what the noise protects, whatever a later message says)
DP_RUN = "fedtune.dp-run"
#: the only metrics a train reply carries under client-level DP: nothing about the data
DP_REPLY_METRICS = frozenset({keys.PARTITION, keys.RAY_NODE, keys.RAY_NODE_IP})

log = logging.getLogger("fedtune")

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


def _payload(message: Message) -> dict[str, torch.Tensor]:
    return keys.record_to_state(message.content.array_records[keys.ADAPTER])


def _round(message: Message) -> int:
    return int(message.content.config_records[keys.CONFIG].get(keys.ROUND, 0))


def _use_cpu_share(scenario: Scenario, context: Context | None = None) -> None:
    """One torch thread per CPU the engine gave this client (oversubscription is slow);
    a deployed client has its machine to itself and keeps torch's default."""
    if context is not None and _deployed(context):
        return
    torch.set_num_threads(max(1, int(scenario.simulation.cpus_per_client)))


def upload_spec(config: Any) -> CompressionSpec:
    """How the server asked this round's update to travel (dense fp32 when unsaid)."""
    return CompressionSpec(density=float(config.get(keys.UPLOAD_DENSITY, 1.0)),
                           values=str(config.get(keys.UPLOAD_VALUES, "fp32")),
                           block_size=int(config.get(keys.BLOCK_SIZE, 256)))


def _client_dp(config: Any, reproducible: bool) -> ClientDP | None:
    """Distributed client-level DP, when the server asks each client for its noise share."""
    if keys.DP_NOISE_STD not in config:
        return None
    return ClientDP(float(config[keys.DP_CLIP]), float(config[keys.DP_NOISE_STD]),
                    tuple(str(config[keys.DP_FIELDS]).split(",")), reproducible)


@functools.lru_cache(maxsize=8)
def _declared_bounds(scenario: Scenario) -> tuple[float, float, float]:
    """(z, epsilon, noise share) the run declares: its z (given, or planned for its
    target), its budget (or without one the epsilon its plan expects), and in
    distributed mode the std of one client's share (the wrapper's own formula)."""
    plan = scenario.privacy_plan()
    budget = scenario.privacy.budget
    share = DPSettings.planned(scenario.privacy, plan).client_noise_std
    return (plan.noise_multiplier, budget if math.isfinite(budget) else plan.planned_epsilon,
            share)


def declared_dp(scenario: Scenario, config: Any) -> DPRequest:
    """The client-level DP this round runs under: the scenario's (the run config every
    node gets), with the clip norm and noise share the message has the client apply."""
    p = scenario.privacy
    if not p.client_level:
        return DPRequest(reproducible=p.reproducible)
    z, epsilon, _ = _declared_bounds(scenario)
    return DPRequest(
        mode=p.mode, clip_norm=max(p.clip_norm, float(config.get(keys.DP_CLIP, 0.0))),
        noise_multiplier=z, epsilon=epsilon,
        share_std=float(config.get(keys.DP_NOISE_STD, 0.0)), min_clients=p.min_clients,
        secure_aggregation=p.secure_aggregation, reproducible=p.reproducible)


def own_floor(context: Context, settings: ClientSettings) -> PrivacyFloor:
    """This client's privacy floor: its node config (``fedtune client`` / the SDK, keys
    ``fedtune.privacy.floor.NODE_CONFIG_KEYS``), and
    its device profile (a deployed client reads its own file; a simulated client has
    the profile the scenario gave it). The strictest of them holds."""
    config = context.node_config
    floor = PrivacyFloor.from_node_config(config)
    if not _deployed(context):
        return floor.strictest(settings.privacy_floor)
    profile = str(config.get(PROFILE, ""))
    if profile:
        from fedtune.planning.profiles import load_profile

        floor = floor.strictest(load_profile(profile).privacy_floor)
    return floor


def train_refusal(scenario: Scenario, config: Any, floor: PrivacyFloor) -> str | None:
    """Why this client does not train this round (None: it does). Floor or not, a
    distributed-DP message must ask for the noise share and clip norm the run declares:
    less noise or a larger clip than the scenario says is refused."""
    declared = declared_dp(scenario, config)
    if declared.mode == "distributed":
        if keys.DP_NOISE_STD not in config or keys.DP_CLIP not in config:
            return "the run is under distributed DP but the message asks for no noise share"
        share = _declared_bounds(scenario)[2]
        if declared.share_std < share * (1 - 1e-9):
            return (f"the message asks for a noise share of std {declared.share_std:.4g}, "
                    f"less than the {share:.4g} the run declares")
        if float(config[keys.DP_CLIP]) > scenario.privacy.clip_norm * (1 + 1e-9):
            return (f"the message asks for clip norm {float(config[keys.DP_CLIP]):.4g}, "
                    f"more than the {scenario.privacy.clip_norm:g} the run declares")
    return refusal(floor, declared)


def _who(context: Context, settings: ClientSettings) -> str:
    if _deployed(context):
        return f"client {str(context.node_config.get(NAME, ''))!r}"
    return f"client {settings.partition}"


def refuse(message: Message, who: str, what: str, reason: str) -> Message:
    """A clear refusal reply (not a crash): the server drops it and logs the reason."""
    text = f"{who} refuses to {what}: {reason}"
    log.warning("%s", text)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=text),
                   reply_to=message)


def _dpsgd(config: Any) -> DpSgd | None:
    if float(config.get(keys.DPSGD_NOISE, 0.0)) <= 0:
        return None
    return DpSgd(SampleLevelDP(float(config[keys.DPSGD_CLIP]), float(config[keys.DPSGD_NOISE])),
                 float(config[keys.DPSGD_DELTA]), str(config[keys.DPSGD_ACCOUNTANT]))


def orders_of(config: Any, payload: ArrayRecord, reproducible: bool = False) -> Orders:
    """What a train message's config asks of the session (defaults where unsaid);
    ``reproducible``: the run's DP draws come from the seed, not OS entropy."""
    return Orders(
        mode=str(config.get(keys.MODE, "continue")), init=str(config.get(keys.INIT, "fresh")),
        freeze_A=bool(config.get(keys.FREEZE_A, False)),
        prune_gamma=float(config.get(keys.PRUNE_GAMMA, 0.0)), upload=upload_spec(config),
        error_feedback=bool(config.get(keys.ERROR_FEEDBACK, True)),
        product_selection=config.get(keys.SELECTION, "tensor") == "product",
        rounded_start=keys.is_packed(payload), client_dp=_client_dp(config, reproducible),
        dpsgd=_dpsgd(config), reproducible=reproducible)


def _kept(context: Context) -> Kept:
    """What this node kept from earlier rounds: error-feedback residual, DP-SGD history."""
    residual = context.state.array_records.get(keys.RESIDUAL)
    history = context.state.config_records.get(keys.DPSGD_HISTORY)
    return Kept({} if residual is None else dict(residual.to_torch_state_dict()),
                [] if history is None
                else list(zip(history["z"], history["q"], history["n"], strict=True)))


def _keep(context: Context, upload: Upload, history: list[DpSgdRound] | None = None) -> None:
    """Store in the node's state what the session says to keep (it never leaves)."""
    if upload.residual is not None:
        context.state[keys.RESIDUAL] = ArrayRecord(upload.residual)
    if history is not None:
        context.state[keys.DPSGD_HISTORY] = ConfigRecord(
            {"z": [float(h[0]) for h in history], "q": [float(h[1]) for h in history],
             "n": [int(h[2]) for h in history]})


def train_session(scenario: Scenario, settings: ClientSettings, message: Message,
                  context: Context | None = None) -> TrainingSession:
    """The session a train message asks for; without ``context``, a node that kept
    nothing from earlier rounds."""
    config = message.content.config_records[keys.CONFIG]
    record = message.content.array_records[keys.ADAPTER]
    return TrainingSession(Trainee.of(scenario, settings),
                           client_seed(int(config[keys.SEED]), settings.partition),
                           keys.record_to_state(record),
                           orders_of(config, record, scenario.privacy.reproducible),
                           None if context is None else _kept(context))


def adapter_record(upload: Upload) -> ArrayRecord:
    """The upload as the reply carries it: the LoRA, or its compressed update."""
    if upload.state is not None:
        return keys.state_to_record(upload.state)
    return keys.blob_to_record(upload.blob)


def _train_metrics(settings: ClientSettings, trainee: Trainee, result: SessionResult,
                   private: bool = False) -> dict[str, float]:
    """The reply's metrics; under client-level DP only those about no data (the loss,
    example count, memory, timings and norms are all un-noised functions of the data)."""
    if private:
        return {keys.PARTITION: settings.partition, **ray_nodes.node_metrics()}
    named = {keys.SAMPLE_EPSILON: result.sample_epsilon,
             keys.DP_UPDATE_NORM: result.upload.update_norm,
             keys.RESIDUAL_NORM_IN: result.upload.residual_norm_in}
    return {
        keys.NUM_EXAMPLES: result.num_examples,
        keys.TRAIN_LOSS: float(result.train.loss),
        keys.PARTITION: settings.partition,
        keys.SECONDS_LOAD: result.seconds_load,
        keys.SECONDS_TRAIN: float(result.train.seconds),
        keys.SECONDS_CODEC: result.seconds_codec,
        keys.PEAK_MEMORY_MB: peak_memory_mb(trainee.device),
        **ray_nodes.node_metrics(),  # which Ray node ran it (nothing when deployed)
        **{key: float(value) for key, value in named.items() if value is not None},
    }


def train_message(scenario: Scenario, message: Message, context: Context,
                  listener: Listener = _quiet) -> Message:
    """Handle one train message: decode it, run the training session, encode the reply
    (the LoRA or, when the server asks for compression, its compressed update)."""
    _use_cpu_share(scenario, context)
    settings = _settings(message, context)
    config = message.content.config_records[keys.CONFIG]
    reason = train_refusal(scenario, config, own_floor(context, settings)) or \
        secagg.threshold_refusal(message)
    if reason is not None:
        listener("refused", _round(message), {"reason": reason})
        return refuse(message, _who(context, settings), "train", reason)
    private = scenario.privacy.client_level
    if private:
        context.state[DP_RUN] = ConfigRecord({"mode": scenario.privacy.mode})
    session = train_session(scenario, settings, message, context)
    data = _node_batch(scenario, context, settings.partition, settings.seq_len).train
    server_round, steps = _round(message), session.trainee.train.steps

    def on_step(done: int, loss: float) -> None:
        listener("step", server_round, {"step": done, "steps": steps, "loss": loss})
    result = session.run(data, on_step)
    _keep(context, result.upload, result.dpsgd_history)
    metrics = _train_metrics(settings, session.trainee, result, private)
    if secagg.asks_secure_aggregation(message):  # keys now, the masked update later
        outgoing = secagg.train_reply(message, context, result.upload, session.start, metrics)
    else:
        outgoing = keys.reply(message, metrics, adapter_record(result.upload),
                              assignment=assignment(session, private))
    # the listener is on this device: it hears every number, sent or not
    listener("train", server_round, _train_metrics(settings, session.trainee, result))
    return outgoing


def assignment(session: TrainingSession, private: bool) -> keys.Assignment:
    """What the session was asked to send back: the LoRA it started from (keys and
    shapes), ffa's frozen A unchanged, under DP no data-dependent metric."""
    start, orders = session.start, session.orders
    if orders.mode == "latent":  # fedsb: one r x r R per module, nothing else
        return keys.Assignment(latent_shapes(start),
                               metrics=DP_REPLY_METRICS if private else None)
    frozen = {k: v for k, v in start.items() if ".lora_A." in k} if orders.freeze_A else {}
    return keys.Assignment({k: tuple(v.shape) for k, v in start.items()},
                           pruning=orders.prune_gamma > 0.0, frozen=frozen,
                           metrics=DP_REPLY_METRICS if private else None)


def eval_refusal(scenario: Scenario, message: Message, context: Context,
                 settings: ClientSettings) -> str | None:
    """Why this client does not send held-out numbers: under client-level DP they are
    un-noised functions of its data, sent only when the scenario opted into it
    (``privacy.federated_eval``) and the client has no floor of its own."""
    if not (scenario.privacy.client_level or DP_RUN in context.state):
        return None
    opted_in = scenario.privacy.federated_eval
    if opted_in and not own_floor(context, settings).is_set:
        return None
    return ("under client-level DP its held-out loss is an un-noised number about its data"
            + (" and it has a privacy floor" if opted_in else
               " (privacy.federated_eval is off)"))


def evaluate_message(scenario: Scenario, message: Message, context: Context,
                     listener: Listener = _quiet) -> Message:
    """Handle one evaluate message: held-out loss of exactly the global adapter."""
    _use_cpu_share(scenario, context)
    settings = _settings(message, context)
    reason = eval_refusal(scenario, message, context, settings)
    if reason is not None:
        listener("refused", _round(message), {"reason": reason})
        return refuse(message, _who(context, settings), "evaluate", reason)
    began = time.perf_counter()
    held_out = _node_batch(scenario, context, settings.partition, settings.seq_len).eval
    result = evaluate_global(scenario, settings, _payload(message), held_out)
    metrics = {
        keys.NUM_EXAMPLES: int(held_out.input_ids.shape[0]),
        keys.EVAL_LOSS: float(result.loss),
        keys.EVAL_TOKENS: int(result.tokens),
        keys.PARTITION: settings.partition,
        keys.SECONDS_EVAL: time.perf_counter() - began,
    }
    listener("evaluate", _round(message), metrics)
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
        if secagg.is_protocol_step(message):  # stages after training: keys and masks only
            return secagg.client_step(message, context)
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

__all__ = ["app", "make_client_app"]
