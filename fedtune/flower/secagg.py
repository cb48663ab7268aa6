"""Secure aggregation (SecAgg+, Bell et al. 2020) on fedtune's Message API: the server
learns the sum of the clients' updates (and how many), not any one of them.

Flower 1.41 ships the protocol as ``SecAggPlusWorkflow`` + ``secaggplus_mod``, but the
workflow needs a ``LegacyContext`` and drives a legacy ``Strategy`` (fedtune runs its own
round loop on a ``Grid``, ``fedtune.flower.rounds``), the mod masks one legacy parameter
list, and both use a numpy Mersenne Twister seeded with 32 bits as the mask "PRG" and
clip values silently when quantising. So this module drives the same four stages itself
with Flower's cryptographic primitives (``flwr.common.secure_aggregation``: ECDH key
agreement + HKDF, Fernet encryption, Shamir secret sharing; key pairs from
``flwr.supercore.primitives.asymmetric``) and fedtune's own arithmetic
(``fedtune.privacy.secure_sum``: ChaCha20 masks, range from the clip norm).

One round, each stage a message to every node still in and its reply:

0. **train**: the normal train message plus the protocol's settings. The client trains,
   clips its update (and, under distributed DP, adds its noise share), quantises it and
   keeps it; it replies with its metrics and two fresh public keys (no adapter).
1. **share-keys**: each node gets its neighbours' public keys (SecAgg+: a random ring of
   ``k`` neighbours, all nodes when ``k`` = 0); it Shamir-shares its mask seed ``b`` and
   its key-agreement secret key (threshold ``t``) and sends each share encrypted for
   its neighbour (the server only forwards ciphertexts).
2. **collect**: each node gets the ciphertexts addressed to it and sends
   ``q(update) + PRG(b) + sum +-PRG(s_ij) mod 2^32``.
3. **unmask**: each survivor gets which neighbours survived and which dropped after
   sharing keys; it returns shares of ``b`` for survivors and of the secret key for the
   dropped, never both for one node. With ``t`` shares of each, the server removes the
   self masks and the dropped nodes' pairwise masks: what is left is the sum.

The sum then goes through the aggregator as one update (``additive`` aggregators are
a mean of updates entry by entry), or through the client-level DP wrapper, which divides
by the clients sampled. Threat model: ``docs/privacy.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.common.serde import recorddict_to_proto
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedtune.aggregation.start import sliced_like
from fedtune.config import ConfigError
from fedtune.core.adapters import ClientUpdate
from fedtune.core.codec import A_SUFFIX, B_SUFFIX, factors_from_state_dict
from fedtune.flower import messages as keys
from fedtune.flower import replies as checks
from fedtune.flower.population import RoundFailedError
from fedtune.privacy.accountant import epsilon_after
from fedtune.privacy.clip import clip_to_norm
from fedtune.privacy.secure_sum import (
    Quantizer,
    add_signed,
    mask_vector,
    modular_sum,
    pair_mask,
    pair_sign,
    quantization_range,
    self_mask,
)

log = logging.getLogger("fedtune")

SECAGG = "secagg"  # the ConfigRecord of every protocol message and reply
STATE = "fedtune.secagg"  # client state: keys, shares, stage (never leaves the node)
VECTOR = "fedtune.secagg.vector"  # client state: the quantised update until it is masked
TRAIN, SHARE, COLLECT, UNMASK, DONE = "train", "share-keys", "collect", "unmask", "done"
NEXT = {TRAIN: SHARE, SHARE: COLLECT, COLLECT: UNMASK}  # the only stage order a client obeys

State = dict[str, torch.Tensor]
Send = Callable[[list[Message]], list[Message]]


# ---- the round's plan (server) -------------------------------------------------------------
@dataclass(frozen=True)
class SecAggSettings:
    """What every client of a round is told: threshold, the vector's layout and range."""

    threshold: int
    rank: int  # every update is zero-padded to this rank (the round's largest)
    fields: tuple[str, ...]  # "A", "B" or only "B" (A frozen)
    clip_norm: float
    noise_std: float  # this client's DP noise share (0: no DP, the client clips only)
    bits: int

    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(quantization_range(self.clip_norm, self.noise_std), self.bits)

    def to_config(self) -> dict[str, Any]:
        return {"stage": TRAIN, "threshold": self.threshold, "rank": self.rank,
                "fields": ",".join(self.fields), "clip-norm": self.clip_norm,
                "noise-std": self.noise_std, "bits": self.bits}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SecAggSettings:
        return cls(int(config["threshold"]), int(config["rank"]),
                   tuple(str(config["fields"]).split(",")), float(config["clip-norm"]),
                   float(config["noise-std"]), int(config["bits"]))


def neighbourhoods(nodes: Sequence[int], size: int) -> dict[int, list[int]]:
    """SecAgg+'s graph: nodes on a ring in an order drawn from OS entropy, each with the
    ``size`` nodes around it (itself included; odd, at most all); ``size`` 0 = everyone."""
    order = list(nodes)
    secrets.SystemRandom().shuffle(order)
    n = len(order)
    k = n if size <= 0 or size >= n else size | 1
    half = min(k, n) // 2
    return {node: sorted({order[(i + d) % n] for d in range(-half, half + 1)})
            for i, node in enumerate(order)}


def threshold_for(neighbourhood: int, wanted: int) -> int:
    """t: ``wanted``, or a majority of the neighbourhood when 0 (at least 2)."""
    t = wanted or neighbourhood // 2 + 1
    if not 2 <= t <= neighbourhood:
        raise ConfigError(f"privacy.secagg_threshold = {wanted} does not fit a neighbourhood "
                          f"of {neighbourhood} nodes; allowed 2 .. {neighbourhood} (0: a "
                          "majority)")
    return t


# ---- the update as one flat vector (both ends) ---------------------------------------------
def layout(modules: Mapping[str, tuple[int, int]], rank: int, fields: Sequence[str]
           ) -> list[tuple[str, tuple[int, int]]]:
    """(peft key, shape at ``rank``) of every entry of the vector, in key order; modules
    map to (in, out) as ``replies.expected_modules`` gives them."""
    out = []
    for module, (fan_in, fan_out) in modules.items():
        if "A" in fields:
            out.append((module + A_SUFFIX, (rank, fan_in)))
        if "B" in fields:
            out.append((module + B_SUFFIX, (fan_out, rank)))
    return sorted(out)


def state_modules(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """module -> (in, out) of a LoRA state dict."""
    return {k[: -len(A_SUFFIX)]: (int(v.shape[1]), int(state[k[: -len(A_SUFFIX)] + B_SUFFIX]
                                                     .shape[0]))
            for k, v in state.items() if k.endswith(A_SUFFIX)}


def _pad(tensor: torch.Tensor, key: str, shape: tuple[int, int]) -> torch.Tensor:
    """``tensor`` zero-padded to ``shape`` (more components, the same module)."""
    if tensor.shape[0] > shape[0] or tensor.shape[1] > shape[1] or (
            tensor.shape[1] != shape[1] if key.endswith(A_SUFFIX) else
            tensor.shape[0] != shape[0]):
        raise ValueError(f"{key}: shape {tuple(tensor.shape)} does not fit {shape}")
    out = torch.zeros(shape, dtype=torch.float64)
    out[: tensor.shape[0], : tensor.shape[1]] = tensor
    return out


def update_vector(state: State, start: State, settings: SecAggSettings) -> np.ndarray:
    """The client's update (final LoRA minus its start), zero-padded to the round's rank,
    flattened in layout order; clipped to the clip norm unless DP already did (then
    clipped and noised: clipping again would change the noise)."""
    begun = sliced_like({k: start[k] for k in state}, state)
    wanted = layout(state_modules(state), settings.rank, settings.fields)
    delta = {k: state[k].double() - begun[k].double() for k, _ in wanted}
    if settings.noise_std == 0:
        delta = clip_to_norm(delta, settings.clip_norm).tensors
    return np.concatenate([_pad(delta[k], k, shape).flatten().numpy() for k, shape in wanted])


def vector_to_state(vector: np.ndarray, entries: list[tuple[str, tuple[int, int]]]) -> State:
    out, at = {}, 0
    for key, shape in entries:
        size = shape[0] * shape[1]
        out[key] = torch.from_numpy(vector[at: at + size].reshape(shape).copy())
        at += size
    return out


# ---- client ----------------------------------------------------------------------------------
def is_protocol_step(message: Message) -> bool:
    """A stage after training (share-keys, collect, unmask): no training content."""
    record = message.content.config_records.get(SECAGG)
    return record is not None and record.get("stage") != TRAIN


def asks_secure_aggregation(message: Message) -> bool:
    return SECAGG in message.content.config_records


#: what a protocol reply may carry besides the metrics of stage 0: keys, ciphertexts,
#: the masked vector, shares (and node ids); nothing about the data in the clear
REPLY_KEYS = {TRAIN: {"pk1", "pk2"}, SHARE: {"destinations", "ciphertexts"},
              COLLECT: {"masked"}, UNMASK: {"nodes", "shares"}}


def _reply(message: Message, stage: str, record: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> Message:
    """The reply of one stage, held to that stage's keys (``keys.check_outgoing`` holds
    the metrics)."""
    if set(record) != REPLY_KEYS[stage]:
        raise keys.PrivacyLeakError(f"a secure aggregation {stage!r} reply carries "
                                    f"{sorted(record)}, not {sorted(REPLY_KEYS[stage])}")
    content = RecordDict({})
    if metrics is not None:
        content[keys.METRICS] = MetricRecord(dict(metrics))
        keys.check_outgoing(content)
    content[SECAGG] = ConfigRecord(dict(record))
    return Message(content=content, reply_to=message)


def train_reply(message: Message, context: Context, upload: Any, start: State,
                metrics: Mapping[str, float]) -> Message:
    """Stage 0 on the client: keep the quantised update (``upload``: the session's
    ``Upload``, uncompressed), answer with two public keys."""
    settings = SecAggSettings.from_config(message.content.config_records[SECAGG])
    if upload.state is None:
        raise ValueError("secure aggregation needs the uncompressed LoRA, not a packed update")
    quantized = settings.quantizer.quantize(update_vector(upload.state, start, settings))
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    context.state[VECTOR] = ArrayRecord({"q": Array(quantized)})
    context.state[STATE] = ConfigRecord({
        "stage": TRAIN, "node": message.metadata.dst_node_id,
        "threshold": settings.threshold,
        "sk1": private_key_to_bytes(sk1), "pk1": public_key_to_bytes(pk1),
        "sk2": private_key_to_bytes(sk2), "pk2": public_key_to_bytes(pk2)})
    state = context.state[STATE]
    return _reply(message, TRAIN, {"pk1": state["pk1"], "pk2": state["pk2"]}, metrics)


def client_step(message: Message, context: Context) -> Message:
    """Stages 1-3 on the client, in order only; anything else is refused."""
    record = message.content.config_records[SECAGG]
    state = context.state.config_records.get(STATE)
    if state is None:
        raise ValueError("secure aggregation: a protocol step before any training")
    stage = str(record["stage"])
    if NEXT.get(str(state["stage"])) != stage:
        raise ValueError(f"secure aggregation: stage {stage!r} after {state['stage']!r}")
    step = {SHARE: _share_keys, COLLECT: _masked_vector, UNMASK: _unmask}[stage]
    answer = step(state, record, context)
    state["stage"] = stage
    return _reply(message, stage, answer)


def _share_keys(state: ConfigRecord, record: ConfigRecord, context: Context) -> dict[str, Any]:
    nodes = [int(n) for n in record["nodes"]]
    pk1s, pk2s = list(record["pk1s"]), list(record["pk2s"])
    me, t = int(state["node"]), int(state["threshold"])
    if len(nodes) < t or len(set(nodes)) != len(nodes) or len(set(pk1s + pk2s)) != 2 * len(
            nodes):
        raise ValueError(f"secure aggregation: {len(nodes)} neighbours (threshold {t}) or "
                         "repeated keys")
    if me not in nodes or (pk1s[nodes.index(me)], pk2s[nodes.index(me)]) != (
            state["pk1"], state["pk2"]):
        raise ValueError("secure aggregation: my own public keys are not in the list")
    seed = os.urandom(32)
    seed_shares = create_shares(seed, t, len(nodes))
    key_shares = create_shares(bytes(state["sk1"]), t, len(nodes))
    sk2 = bytes_to_private_key(bytes(state["sk2"]))
    destinations, ciphertexts = [], []
    for i, node in enumerate(nodes):
        if node == me:
            continue
        channel = generate_shared_key(sk2, bytes_to_public_key(pk2s[i]))
        plain = share_keys_plaintext_concat(me, node, seed_shares[i], key_shares[i])
        destinations.append(node)
        ciphertexts.append(encrypt(channel, plain))
    mine = nodes.index(me)
    state.update({"seed": seed, "nodes": nodes, "pk1s": pk1s, "pk2s": pk2s,
                  "holders": [me], "seed-shares": [seed_shares[mine]],
                  "key-shares": [key_shares[mine]]})
    return {"destinations": destinations, "ciphertexts": ciphertexts}


def _masked_vector(state: ConfigRecord, record: ConfigRecord, context: Context
                   ) -> dict[str, Any]:
    me, t = int(state["node"]), int(state["threshold"])
    nodes, pk1s = [int(n) for n in state["nodes"]], list(state["pk1s"])
    sources, texts = [int(s) for s in record["sources"]], list(record["ciphertexts"])
    if len(sources) + 1 < t or len(set(sources)) != len(sources) or me in sources:
        raise ValueError(f"secure aggregation: shares from {len(sources)} neighbours, "
                         f"threshold {t}")
    sk1 = bytes_to_private_key(bytes(state["sk1"]))
    sk2 = bytes_to_private_key(bytes(state["sk2"]))
    holders, seed_shares, key_shares = list(state["holders"]), list(state["seed-shares"]), \
        list(state["key-shares"])
    pair_secrets = {}
    for source, text in zip(sources, texts, strict=True):
        if source not in nodes:
            raise ValueError(f"secure aggregation: a share from node {source}, not a neighbour")
        channel = generate_shared_key(sk2, bytes_to_public_key(state["pk2s"][nodes.index(source)]))
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(
            decrypt(channel, text))
        if (sender, receiver) != (source, me):
            raise ValueError(f"secure aggregation: a share from {sender} to {receiver} came "
                             f"as {source} to {me}")
        holders.append(source)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
        pair_secrets[source] = generate_shared_key(
            sk1, bytes_to_public_key(pk1s[nodes.index(source)]))
    quantized = context.state.array_records[VECTOR]["q"].numpy()
    masked = mask_vector(quantized, bytes(state["seed"]), me, pair_secrets)
    del context.state[VECTOR]
    state.update({"holders": holders, "seed-shares": seed_shares, "key-shares": key_shares})
    return {"masked": masked.astype("<u4").tobytes()}


def _unmask(state: ConfigRecord, record: ConfigRecord, context: Context) -> dict[str, Any]:
    """Shares of ``b`` for the survivors, of the secret key for the dropped; never both
    for one node (with both the server could unmask that node's vector)."""
    active, dead = [int(n) for n in record["active"]], [int(n) for n in record["dead"]]
    holders = [int(n) for n in state["holders"]]
    t = int(state["threshold"])
    if set(active) & set(dead) or not set(active + dead) <= set(holders):
        raise ValueError("secure aggregation: a node listed as both survivor and dropped, "
                         "or one I hold no share of")
    if len(active) < t:
        raise ValueError(f"secure aggregation: {len(active)} survivors, fewer than the "
                         f"threshold {t}")
    seed_shares, key_shares = list(state["seed-shares"]), list(state["key-shares"])
    shares = [seed_shares[holders.index(n)] for n in active] + \
        [key_shares[holders.index(n)] for n in dead]
    for secret in ("seed", "sk1", "sk2", "seed-shares", "key-shares"):
        state[secret] = b"" if secret in ("seed", "sk1", "sk2") else [b""]
    return {"nodes": active + dead, "shares": shares}


# ---- server ----------------------------------------------------------------------------------
@dataclass
class SecureSum:
    """One round's outcome on the server: the sum of the survivors' vectors."""

    total: np.ndarray
    survivors: list[int]
    dropped: dict[int, str] = field(default_factory=dict)  # node -> stage it was lost in
    train_replies: dict[int, Message] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def record_bytes(content: RecordDict) -> int:
    """Serialised size of a message's content (what travels)."""
    return int(recorddict_to_proto(content).ByteSize())


def _stage_message(node: int, server_round: int, record: Mapping[str, Any]) -> Message:
    from flwr.app import MessageType

    return Message(content=RecordDict({SECAGG: ConfigRecord(dict(record))}),
                   message_type=MessageType.TRAIN, dst_node_id=node,
                   group_id=str(server_round))


class _Exchange:
    """Sends one stage, keeps the good replies, counts bytes and who was lost where."""

    def __init__(self, send: Send, outcome: SecureSum, server_round: int,
                 private: bool = False) -> None:
        self.send, self.outcome, self.round = send, outcome, server_round
        self.private = private  # client-level DP: log no node and no reason

    def __call__(self, stage: str, messages: list[Message], needed: Sequence[str]
                 ) -> dict[int, Message]:
        began = time.perf_counter()
        targets = {m.metadata.dst_node_id for m in messages}
        for m in messages:
            node = m.metadata.dst_node_id
            self.outcome.bytes_down[node] = self.outcome.bytes_down.get(node, 0) + \
                record_bytes(m.content)
        good: dict[int, Message] = {}
        replies = self.send(messages)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:  # an error for a lost node comes from the SuperLink's id
            node = sent_to.get(reply.metadata.reply_to_message_id, -1)
            if node not in targets or node in good:
                continue
            if reply.has_error():
                self._lose(node, stage, checks.short_reason(reply.error.reason))
                continue
            self.outcome.bytes_up[node] = self.outcome.bytes_up.get(node, 0) + \
                record_bytes(reply.content)
            record = reply.content.config_records.get(SECAGG)
            if record is None or any(k not in record for k in needed):
                self._lose(node, stage, f"reply without {', '.join(needed)}")
                continue
            good[node] = reply
        for node in targets - set(good) - set(self.outcome.dropped):
            self._lose(node, stage, "no reply")
        self.outcome.seconds[stage] = time.perf_counter() - began
        return good

    def _lose(self, node: int, stage: str, reason: str) -> None:
        self.outcome.dropped[node] = f"{stage}: {reason}"
        if self.private:
            log.warning("round %d: secure aggregation lost a client at %s", self.round, stage)
            return
        log.warning("round %d: secure aggregation lost node %s at %s: %s", self.round, node,
                    stage, reason)


def _enough(live: set[int], graph: Mapping[int, list[int]], t: int, stage: str) -> None:
    short = [n for n in live if len(set(graph[n]) & live) < t]
    if len(live) < t:
        raise RoundFailedError(f"secure aggregation: after {stage}, {len(live)} nodes are "
                               f"left, fewer than the threshold {t}")
    if short:
        raise RoundFailedError(f"secure aggregation: after {stage}, {len(short)} nodes have "
                               f"fewer than the threshold {t} of live neighbours")


def run_protocol(send: Send, messages: list[Message], server_round: int, neighbours: int,
                 wanted_threshold: int, settings: SecAggSettings, size: int,
                 private: bool = False) -> SecureSum:
    """Stages 0-3 for ``messages`` (the round's train messages, without the protocol's
    record); the sum of the vectors (``size`` words each) of the nodes that lasted."""
    nodes = [m.metadata.dst_node_id for m in messages]
    graph = neighbourhoods(nodes, neighbours)
    t = threshold_for(len(next(iter(graph.values()))), wanted_threshold)
    settings = dataclasses.replace(settings, threshold=t)
    outcome = SecureSum(np.zeros(size, dtype="<u4"), [])
    exchange = _Exchange(send, outcome, server_round, private)
    for m in messages:
        m.content[SECAGG] = ConfigRecord(settings.to_config())
    keyed = exchange(TRAIN, messages, ("pk1", "pk2"))
    outcome.train_replies = dict(keyed)
    live = set(keyed)
    _enough(live, graph, t, TRAIN)
    pks = {n: (bytes(r.content.config_records[SECAGG]["pk1"]),
               bytes(r.content.config_records[SECAGG]["pk2"])) for n, r in keyed.items()}

    def peers(node: int) -> list[int]:
        return [n for n in graph[node] if n in live]
    shared = exchange(SHARE, [_stage_message(n, server_round, {
        "stage": SHARE, "nodes": peers(n), "pk1s": [pks[p][0] for p in peers(n)],
        "pk2s": [pks[p][1] for p in peers(n)]}) for n in sorted(live)],
        ("destinations", "ciphertexts"))
    live = set(shared)
    _enough(live, graph, t, SHARE)
    mail = _mailboxes(shared, graph)
    keyed_set = set(live)  # nodes whose shares are out: their masks are in others' vectors
    masked = exchange(COLLECT, [_stage_message(n, server_round, {
        "stage": COLLECT, "sources": [s for s, _ in mail[n]],
        "ciphertexts": [c for _, c in mail[n]]}) for n in sorted(live)], ("masked",))
    vectors = _vectors(masked, size, exchange)
    live = set(vectors)
    _enough(live, graph, t, COLLECT)
    dead = keyed_set - live
    asked = {n: {"active": [p for p in graph[n] if p in live],
                 "dead": [p for p in graph[n] if p in dead]} for n in sorted(live)}
    unmasked = exchange(UNMASK, [_stage_message(n, server_round, {"stage": UNMASK, **ask})
                                 for n, ask in asked.items()], ("nodes", "shares"))
    shares = _shares(unmasked, asked, live | dead)
    total = modular_sum([vectors[n] for n in sorted(live)])
    outcome.total = _remove_masks(total, shares, live, dead, graph, pks, t)
    outcome.survivors = sorted(live)
    return outcome


def _mailboxes(shared: Mapping[int, Message], graph: Mapping[int, list[int]]
               ) -> dict[int, list[tuple[int, bytes]]]:
    """Each node's incoming (source, ciphertext) pairs, from neighbours only."""
    mail: dict[int, list[tuple[int, bytes]]] = {n: [] for n in shared}
    for source, reply in shared.items():
        record = reply.content.config_records[SECAGG]
        for dst, text in zip(record["destinations"], record["ciphertexts"], strict=True):
            if int(dst) in mail and int(dst) in graph[source] and int(dst) != source:
                mail[int(dst)].append((source, bytes(text)))
    return mail


def _vectors(masked: Mapping[int, Message], size: int, exchange: _Exchange
             ) -> dict[int, np.ndarray]:
    """The masked vectors of the right length (a node that sent another is lost)."""
    vectors = {}
    for node, reply in masked.items():
        raw = bytes(reply.content.config_records[SECAGG]["masked"])
        if len(raw) != 4 * size:
            exchange._lose(node, COLLECT, f"masked vector of {len(raw)} bytes, not {4 * size}")
            continue
        vectors[node] = np.frombuffer(raw, dtype="<u4")
    return vectors


def _shares(unmasked: Mapping[int, Message], asked: Mapping[int, Mapping[str, list[int]]],
            owners: set[int]) -> dict[int, list[bytes]]:
    """owner -> the shares of its secret the survivors sent; only those each was asked
    for (a share of the other kind would spoil the reconstruction)."""
    shares: dict[int, list[bytes]] = {n: [] for n in owners}
    for node, reply in unmasked.items():
        record = reply.content.config_records[SECAGG]
        wanted = set(asked[node]["active"]) | set(asked[node]["dead"])
        for owner, share in zip(record["nodes"], record["shares"], strict=True):
            if int(owner) in wanted:
                shares[int(owner)].append(bytes(share))
    return shares


def _remove_masks(total: np.ndarray, shares: Mapping[int, list[bytes]], live: set[int],
                  dead: set[int], graph: Mapping[int, list[int]],
                  pks: Mapping[int, tuple[bytes, bytes]], t: int) -> np.ndarray:
    short = sorted(n for n, s in shares.items() if len(s) < t)
    if short:
        raise RoundFailedError(f"secure aggregation: fewer than {t} shares to unmask "
                               f"{len(short)} nodes")
    for node in sorted(live):
        total = add_signed(total, self_mask(combine_shares(shares[node]), total.size), -1)
    for node in sorted(dead):
        secret_key = bytes_to_private_key(combine_shares(shares[node]))
        for other in graph[node]:
            if other in live:  # ``other`` added sign(other, node) * PRG(s): take it back
                secret = generate_shared_key(secret_key, bytes_to_public_key(pks[other][0]))
                total = add_signed(total, pair_mask(secret, total.size),
                                   -pair_sign(other, node))
    return total


# ---- the round on the server: plan, protocol, aggregate --------------------------------------
def round_settings(strategy: Any, messages: Sequence[Message]) -> SecAggSettings:
    """The layout and range every client of this round gets; the noise std is the one
    the train messages ask the clients for (distributed DP), 0 without."""
    p = strategy.scenario.privacy
    nodes = [m.metadata.dst_node_id for m in messages]
    ranks = {strategy.population.settings_for(n).rank for n in nodes}
    scales = {strategy.population.settings_for(n).alpha / strategy.population.settings_for(n)
              .rank for n in nodes}
    if len(scales) > 1:
        raise ConfigError(f"privacy.secure_aggregation needs one LoRA scale alpha / r across "
                          f"clients, got {sorted(scales)}: updates at different scales "
                          "cannot be summed entry by entry")
    fields = ("B",) if strategy.aggregator.capabilities.freeze_A else ("A", "B")
    noise = max(float(m.content.config_records[keys.CONFIG].get(keys.DP_NOISE_STD, 0.0))
                for m in messages)
    return SecAggSettings(0, max(ranks), fields, p.clip_norm, noise, p.secagg_bits)


#: fewer clients than this in a round and the sum would tell each of them the others'
MIN_CLIENTS = 3


def secure_train(strategy: Any, send: Send, server_round: int, messages: list[Message]
                 ) -> MetricRecord:
    """The round's train phase under secure aggregation; the new global adapter goes to
    ``strategy.global_adapter``, the round's metrics are returned. A round with fewer
    than ``MIN_CLIENTS`` sends no work: under DP it releases noise only, else it fails."""
    nodes = [m.metadata.dst_node_id for m in messages]
    if len(nodes) < MIN_CLIENTS:
        return _too_few(strategy, server_round, len(nodes))
    p = strategy.scenario.privacy
    settings = round_settings(strategy, messages)
    entries = layout(strategy.expected, settings.rank, settings.fields)
    size = sum(a * b for _, (a, b) in entries)
    settings.quantizer.check_capacity(len(nodes))
    outcome = run_protocol(send, messages, server_round, p.secagg_neighbours,
                           p.secagg_threshold, settings, size, private=strategy.dp is not None)
    minimum, rule = strategy.population.minimum_replies()
    if len(outcome.survivors) < minimum:
        raise RoundFailedError(f"round {server_round}: {len(outcome.survivors)} clients in "
                               f"the secure sum, fewer than {rule}")
    summed = settings.quantizer.dequantize_sum(outcome.total, len(outcome.survivors))
    start = time.perf_counter()
    update = _summed_update(strategy, outcome.survivors, vector_to_state(summed, entries),
                            settings)
    if strategy.dp is None:
        strategy.global_adapter = strategy.aggregator.aggregate([update],
                                                                strategy.global_adapter)
    else:  # one equal part of the sum per survivor: the wrapper counts the noise shares
        strategy.global_adapter = strategy.dp_release(server_round,
                                              [update] * len(outcome.survivors))
    return _round_metrics(strategy, server_round, outcome, settings,
                          time.perf_counter() - start)


def _too_few(strategy: Any, server_round: int, clients: int) -> MetricRecord:
    reason = (f"round {server_round}: {clients} clients sampled, fewer than the "
              f"{MIN_CLIENTS} secure aggregation needs (with fewer, the sum tells each "
              "client the others' updates)")
    if strategy.dp is None:
        raise RoundFailedError(reason)
    log.warning("%s; no work sent, the round releases noise only", reason)
    strategy.global_adapter = strategy.dp_release(server_round, [])
    return MetricRecord({"num-clients": 0, "seconds-aggregate": 0.0,
                         **{k.replace("_", "-"): float(v)
                            for k, v in strategy.dp.metrics().items()}})


def _start_state(strategy: Any, node: int, rank: int | None = None) -> State:
    """The LoRA ``node`` started from (rebuilt as the client built it), or that of a
    client of its settings at ``rank``."""
    settings = strategy.population.settings_for(node)
    if rank is not None:
        settings = dataclasses.replace(settings, rank=rank,
                                       alpha=settings.alpha / settings.rank * rank)
    shapes = {k: torch.empty(shape) for k, shape in
              layout(strategy.expected, settings.rank, ("A", "B"))}
    return checks.client_start_state(settings, shapes, strategy._rules())


def _summed_update(strategy: Any, survivors: list[int], summed: State,
                   settings: SecAggSettings) -> ClientUpdate:
    """The sum as one update of the round's rank. Without DP: the mean of the survivors'
    starts (zero-padded) plus the mean update, which is what an additive aggregator makes
    of equally weighted clients; with DP: start plus the sum (the wrapper divides by
    the clients sampled; the caller passes it once per survivor, so each copy is one
    survivor's share of the sum)."""
    widest = max(strategy.stats.nodes, key=lambda n: strategy.population.settings_for(n).rank)
    start = _start_state(strategy, widest, settings.rank)
    entries = dict(layout(strategy.expected, settings.rank, ("A", "B")))
    scale = strategy.population.settings_for(widest).alpha / \
        strategy.population.settings_for(widest).rank
    if strategy.dp is not None:
        n = len(survivors)
        final = {k: start[k].double() + summed.get(k, 0.0) / n for k in start}
    else:
        n = len(survivors)
        starts = [_start_state(strategy, s) for s in survivors]
        final = {k: sum(_pad(s[k], k, entries[k]) for s in starts) / n + summed.get(k, 0.0) / n
                 for k in start}
    as_float = {k: v.to(torch.float32) for k, v in final.items()}
    return ClientUpdate(factors_from_state_dict(as_float, scale), num_examples=1,
                        client_id="secure-sum", start=factors_from_state_dict(start, scale))


def _round_metrics(strategy: Any, server_round: int, outcome: SecureSum,
                   settings: SecAggSettings, seconds: float) -> MetricRecord:
    """Like ``FedtuneStrategy.aggregate_train``'s, from the survivors' stage-0 metrics;
    each client's record counts the bytes of all four stages."""
    stats = strategy.stats
    losses, examples = [], []
    private = strategy.dp is not None  # client-level DP: who took part is a secret
    for node in outcome.survivors:
        metrics = dict(outcome.train_replies[node].content.metric_records[keys.METRICS])
        losses.append(float(metrics.get(keys.TRAIN_LOSS, math.nan)))
        examples.append(max(1, int(metrics.get(keys.NUM_EXAMPLES, 1))))
        if private:  # counts only (docs/privacy.md, "the mechanism as run")
            continue
        record = {**{k.replace("-", "_"): v for k, v in metrics.items()},
                  "round": server_round, "phase": "train", "node_id": node,
                  "client": str(strategy.node_partition.get(node, node)),
                  "bytes_up": outcome.bytes_up.get(node, 0),
                  "bytes_down": stats.down_by_node.get(node, 0)
                  + outcome.bytes_down.get(node, 0), "bytes_up_dense": 0}
        stats.client_records.append(record)
        strategy.on_client(record)
    stats.dropped.extend(f"{'a sampled client' if private else f'node {n}'}: secure "
                         f"aggregation, {why}" for n, why in sorted(outcome.dropped.items()))
    stats.bytes_up += sum(outcome.bytes_up.values())
    stats.bytes_down += sum(outcome.bytes_down.values())
    total = sum(examples)
    loss = {} if any(math.isnan(x) for x in losses) else {  # none under client-level DP
        "train-loss": sum(x * n for x, n in zip(losses, examples, strict=True)) / total}
    return MetricRecord({
        **loss, "num-clients": len(outcome.survivors), "seconds-aggregate": seconds,
        "secagg-dropped": len(outcome.dropped), "secagg-bits": settings.bits,
        "secagg-range": settings.quantizer.value_range,
        "secagg-sum-error-bound": settings.quantizer.sum_error_bound(len(outcome.survivors)),
        **{f"secagg-seconds-{stage}": s for stage, s in outcome.seconds.items()},
        **{k.replace("_", "-"): float(v) for k, v in (strategy.dp or strategy.aggregator)
           .metrics().items()},
    })



# ---- the summary: what the server sees -------------------------------------------------------
def server_view(privacy: Any, dp: Any) -> dict[str, Any]:
    """For the summary's privacy section: what the server sees of one client's update.

    Distributed DP without secure aggregation is allowed but not dressed up: the server
    sees each client's own share, noised with only z / sqrt(min_clients) of the noise, so
    the summary gives the epsilon that share alone has against the server (neighbouring:
    one client's data replaced, so sensitivity 2 C; no amplification by sampling, the
    server knows who took part; every released round counted, as if the client took part
    in each). The run's epsilon holds against whoever sees only the aggregate."""
    if privacy.secure_aggregation:
        return {"secure_aggregation": "SecAgg+ (fedtune.flower.secagg; threat model in "
                                      "docs/privacy.md)",
                "server_sees": "the sum of the round's clipped (and noised) updates and how "
                               "many clients it holds; no client's update"}
    if dp is None or privacy.mode != "distributed":
        return {}
    local_z = dp.settings.noise_multiplier / (2 * math.sqrt(dp.settings.min_clients))
    rounds = int(dp.accountant.releases)
    return {"secure_aggregation": "off",
            "server_sees": "each client's clipped and noised share",
            "local_noise_multiplier": local_z,
            "local_epsilon": epsilon_after([(local_z, 1.0, rounds)], privacy.delta,
                                           privacy.accountant) if rounds else 0.0,
            "local_epsilon_for": "one client's own shares against the server: its data "
                                 "replaced (sensitivity 2 C), no subsampling, every "
                                 "released round"}
