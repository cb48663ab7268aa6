"""The fedtune ClientApp: Flower's side of a client.

Each handler decodes a Message into plain inputs, calls what does the work
(``fedtune.train.session`` trains, ``fedtune.train.held_out`` evaluates) and encodes the
result into the reply. The base model and the client's tokenised partition are cached
per process, so a simulation worker (or a long-lived SuperNode process) loads them once
and serves every round and every virtual client it runs. Only adapter tensors and scalar
metrics leave the client.

What a client enforces itself, whatever the server asks (docs/privacy.md, "What a client
enforces"): the scenario it holds (sealed in a deployment) as its only authority, every
setting it applies derived from it (``fedtune.flower.orders``) and a message asking for
anything else refused, naming the setting; at most ``run.rounds`` trainings a run; its
own privacy floor, its own epsilon included (a weaker request is refused with a reply
that says why, before any training); under DP, a train reply that carries the update
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
from collections.abc import Callable, Mapping
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
from fedtune.flower.orders import (
    allowed_settings,
    order_refusal,
    scenario_orders,
    secagg_refusal,
    settings_refusal,
)
from fedtune.model.device import peak_memory_mb
from fedtune.planning.client_settings import ClientSettings
from fedtune.privacy.floor import DPRequest, PrivacyFloor, refusal, spent_refusal
from fedtune.train import attacks
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
#: node state: how many train messages this node trained for in this run (at most
#: run.rounds: a server that sends more to average the noise away is refused)
TRAINED = "fedtune.trained"
#: the only metrics a train reply carries under client-level DP: nothing about the data
DP_REPLY_METRICS = frozenset({keys.PARTITION, keys.RAY_NODE, keys.RAY_NODE_IP})
#: ... and under sample-level DP alone: besides, the expected example count (steps x
#: expected batch, not the data's) and its DP-SGD epsilon (z, q and steps: the size of
#: its data is public to DP-SGD's accountant); no loss, timing or memory
SAMPLE_DP_REPLY_METRICS = DP_REPLY_METRICS | {keys.NUM_EXAMPLES, keys.SAMPLE_EPSILON}

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


def upload_spec(orders: Mapping[str, Any]) -> CompressionSpec:
    """How the scenario orders this round's update to travel."""
    return CompressionSpec(density=float(orders[keys.UPLOAD_DENSITY]),
                           values=str(orders[keys.UPLOAD_VALUES]),
                           block_size=int(orders[keys.BLOCK_SIZE]))


def _client_dp(orders: Mapping[str, Any], reproducible: bool) -> ClientDP | None:
    """Distributed client-level DP, when the scenario has each client add its noise share."""
    if keys.DP_NOISE_STD not in orders:
        return None
    return ClientDP(float(orders[keys.DP_CLIP]), float(orders[keys.DP_NOISE_STD]),
                    tuple(str(orders[keys.DP_FIELDS]).split(",")), reproducible)


@functools.lru_cache(maxsize=8)
def _declared_bounds(scenario: Scenario) -> tuple[float, float]:
    """(z, epsilon) the run declares: its z (given, or planned for its target), and its
    budget (or without one the epsilon its plan expects)."""
    plan = scenario.privacy_plan()
    budget = scenario.privacy.budget
    return plan.noise_multiplier, budget if math.isfinite(budget) else plan.planned_epsilon


def declared_dp(scenario: Scenario) -> DPRequest:
    """The client-level DP this run declares: the scenario's (the run config every node
    gets, sealed in a deployment), with the clip norm and noise share it orders."""
    p = scenario.privacy
    if not p.client_level:
        return DPRequest(reproducible=p.reproducible)
    z, epsilon = _declared_bounds(scenario)
    share = float(scenario_orders(scenario).get(keys.DP_NOISE_STD, 0.0))
    return DPRequest(
        mode=p.mode, clip_norm=p.clip_norm, noise_multiplier=z, epsilon=epsilon,
        share_std=share, min_clients=p.min_clients,
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


def train_refusal(scenario: Scenario, config: Any, floor: PrivacyFloor, trained: int = 0,
                  secure: Any = None) -> str | None:
    """Why this client does not train this round (None: it does). Floor or not, the
    message must ask for exactly what the scenario orders (``orders.order_refusal``), and
    for secure aggregation exactly when the scenario has it (``secure``: the message's
    record, None without) with the settings it orders; and the client trains at most
    ``run.rounds`` times a run (``trained``: so far). With a floor, the run's declared DP
    must meet it, and so must this client's own epsilon after this round
    (``floor.spent_refusal``)."""
    reason = order_refusal(scenario_orders(scenario), config)
    if reason is not None:
        return reason
    p = scenario.privacy
    if (secure is not None) != p.secure_aggregation:
        return (f"the message asks for {'' if secure is not None else 'no '}secure "
                "aggregation; the run's sealed scenario has privacy.secure_aggregation = "
                f"{str(p.secure_aggregation).lower()}")
    if secure is not None and (reason := secagg_refusal(scenario, secure)) is not None:
        return reason
    if trained >= scenario.run.rounds:
        return (f"it has trained {trained} times in this run, the sealed run.rounds = "
                f"{scenario.run.rounds}")
    declared = declared_dp(scenario)
    return refusal(floor, declared) or spent_refusal(floor, declared, trained + 1, p.delta,
                                                     p.accountant)


def declared_profile(context: Context) -> str:
    """The device profile a deployed client declares to the server, as TOML text ("": none)."""
    profile = str(context.node_config.get(PROFILE, ""))
    if not profile:
        return ""
    from fedtune.planning.profiles import profile_path

    return profile_path(profile).read_text()


def own_settings_refusal(scenario: Scenario, settings: ClientSettings, context: Context
                         ) -> str | None:
    """Why a train message's client settings (rank, alpha, batch size, sequence length,
    quantization, profile) are not what this client derives from its sealed scenario
    and, deployed, its own profile (``orders.settings_refusal``); None: they are."""
    deployed = _deployed(context)
    if context.node_config.get(MODEL) and context.run_config:  # resolved against the
        scenario = scenario_from_flat(context.run_config)  # base, as the server did
    allowed = allowed_settings(scenario, settings.partition,
                               declared_profile(context) if deployed else None, deployed)
    return settings_refusal(scenario, settings, allowed, deployed)


def trained_so_far(context: Context) -> int:
    """How many train messages this node has trained for in this run (node state)."""
    record = context.state.config_records.get(TRAINED)
    return 0 if record is None else int(record["count"])


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


def _dpsgd(orders: Mapping[str, Any]) -> DpSgd | None:
    if float(orders.get(keys.DPSGD_NOISE, 0.0)) <= 0:
        return None
    return DpSgd(SampleLevelDP(float(orders[keys.DPSGD_CLIP]), float(orders[keys.DPSGD_NOISE])),
                 float(orders[keys.DPSGD_DELTA]), str(orders[keys.DPSGD_ACCOUNTANT]))


def orders_of(orders: Mapping[str, Any], payload: ArrayRecord, reproducible: bool = False
              ) -> Orders:
    """The session's orders from what the scenario orders (``scenario_orders``, never a
    message's config); ``reproducible``: the run's DP draws come from the seed, not OS
    entropy."""
    return Orders(
        mode=str(orders[keys.MODE]), init=str(orders[keys.INIT]),
        freeze_A=bool(orders[keys.FREEZE_A]), prune_gamma=float(orders[keys.PRUNE_GAMMA]),
        upload=upload_spec(orders), error_feedback=bool(orders[keys.ERROR_FEEDBACK]),
        product_selection=orders[keys.SELECTION] == "product",
        rounded_start=keys.is_packed(payload), client_dp=_client_dp(orders, reproducible),
        dpsgd=_dpsgd(orders), reproducible=reproducible)


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
    """The session of a train message: its round's seed and payload, trained as the
    scenario orders (not as the message says: ``train_refusal`` refused a message that
    asks otherwise); without ``context``, a node that kept nothing from earlier rounds."""
    config = message.content.config_records[keys.CONFIG]
    record = message.content.array_records[keys.ADAPTER]
    return TrainingSession(Trainee.of(scenario, settings),
                           client_seed(int(config[keys.SEED]), settings.partition),
                           keys.record_to_state(record),
                           orders_of(scenario_orders(scenario), record,
                                     scenario.privacy.reproducible),
                           None if context is None else _kept(context))


def adapter_record(upload: Upload) -> ArrayRecord:
    """The upload as the reply carries it: the LoRA, or its compressed update."""
    if upload.state is not None:
        return keys.state_to_record(upload.state)
    return keys.blob_to_record(upload.blob)


def reply_metrics(scenario: Scenario) -> frozenset[str] | None:
    """The only metric names a train reply may carry under the scenario's DP (None: any)."""
    if scenario.privacy.client_level:
        return DP_REPLY_METRICS
    return SAMPLE_DP_REPLY_METRICS if scenario.privacy.sample_level else None


def expected_examples(trainee: Trainee) -> int:
    """DP-SGD's example count: steps x its expected Poisson batch, whatever the data."""
    train = trainee.train
    return train.steps * train.batch_size * train.grad_accum


def _train_metrics(settings: ClientSettings, trainee: Trainee, result: SessionResult,
                   allowed: frozenset[str] | None = None) -> dict[str, float]:
    """The reply's metrics; under DP (``allowed``) only those about no data (the loss,
    example count, memory, timings and norms are all un-noised functions of the data;
    under DP-SGD alone the count is the expected one)."""
    if allowed is not None:
        kept = {keys.PARTITION: settings.partition, **ray_nodes.node_metrics(),
                keys.NUM_EXAMPLES: expected_examples(trainee)}
        if result.sample_epsilon is not None:
            kept[keys.SAMPLE_EPSILON] = float(result.sample_epsilon)
        return {k: v for k, v in kept.items() if k in allowed}
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
    trained = trained_so_far(context)
    reason = (train_refusal(scenario, config, own_floor(context, settings), trained,
                            message.content.config_records.get(secagg.SECAGG))
              or own_settings_refusal(scenario, settings, context)
              or secagg.threshold_refusal(message))
    if reason is not None:
        listener("refused", _round(message), {"reason": reason})
        return refuse(message, _who(context, settings), "train", reason)
    private, allowed = scenario.privacy.client_level, reply_metrics(scenario)
    if private:
        context.state[DP_RUN] = ConfigRecord({"mode": scenario.privacy.mode})
    context.state[TRAINED] = ConfigRecord({"count": trained + 1})
    session = train_session(scenario, settings, message, context)
    data = _node_batch(scenario, context, settings.partition, settings.seq_len).train
    data = attacks.poisoned_data(scenario, settings.partition, data)  # [attack] only
    server_round, steps = _round(message), session.trainee.train.steps

    def on_step(done: int, loss: float) -> None:
        listener("step", server_round, {"step": done, "steps": steps, "loss": loss})
    result = session.run(data, on_step)
    result = attacks.attacked_result(scenario, settings.partition, result, session.start,
                                     session.seed)  # [attack] only: honest clients as is
    _keep(context, result.upload, result.dpsgd_history)
    metrics = _train_metrics(settings, session.trainee, result, allowed)
    if secagg.asks_secure_aggregation(message):  # keys now, the masked update later
        outgoing = secagg.train_reply(message, context, result.upload, session.start, metrics)
    else:
        outgoing = keys.reply(message, metrics, adapter_record(result.upload),
                              assignment=assignment(session, allowed))
    # the listener is on this device: it hears every number, sent or not
    listener("train", server_round, _train_metrics(settings, session.trainee, result))
    return outgoing


def assignment(session: TrainingSession, allowed: frozenset[str] | None = None
               ) -> keys.Assignment:
    """What the session was asked to send back: the LoRA it started from (keys and
    shapes), ffa's frozen A unchanged, under DP only the ``allowed`` metrics."""
    start, orders = session.start, session.orders
    if orders.mode == "latent":  # fedsb: one r x r R per module, nothing else
        return keys.Assignment(latent_shapes(start), metrics=allowed)
    frozen = {k: v for k, v in start.items() if ".lora_A." in k} if orders.freeze_A else {}
    return keys.Assignment({k: tuple(v.shape) for k, v in start.items()},
                           pruning=orders.prune_gamma > 0.0, frozen=frozen, metrics=allowed)


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
    return keys.reply(message, {keys.PARTITION: -1},
                      identity={keys.CLIENT_NAME: str(context.node_config.get(NAME, "")),
                                keys.CLIENT_PROFILE: declared_profile(context)})


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
