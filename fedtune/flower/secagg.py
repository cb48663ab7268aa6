"""Secure aggregation (SecAgg+, Bell et al. 2020) on fedtune's Message API: the server
learns the sum of the clients' updates (and how many), not any one of them.

Flower 1.41 ships the protocol as ``SecAggPlusWorkflow`` + ``secaggplus_mod``, but the
workflow needs a ``LegacyContext`` and drives a legacy ``Strategy`` (fedtune runs its own
round loop on a ``Grid``, ``fedtune.flower.rounds``), the mod masks one legacy parameter
list, and both use a numpy Mersenne Twister seeded with 32 bits as the mask "PRG" and
clip values silently when quantising. So this module drives the same stages itself
(plus an ``open`` stage of its own, so a junk share costs its sender, not the round)
with Flower's cryptographic primitives (``flwr.common.secure_aggregation``: ECDH key
agreement + HKDF, Fernet encryption, Shamir secret sharing; key pairs from
``flwr.supercore.primitives.asymmetric``) and fedtune's own arithmetic
(``fedtune.privacy.secure_sum``: ChaCha20 masks, range from the clip norm).

One round, each stage a message to every node still in and its reply:

0. **train**: the normal train message plus the protocol's settings. The client trains,
   clips its update (and, under distributed DP, adds its noise share), quantises it and
   keeps it; it replies with its metrics and two fresh public keys (no adapter). It
   refuses a threshold below 2.
1. **share-keys**: each node gets its neighbours' public keys (SecAgg+: a random ring of
   ``k`` neighbours, all nodes when ``k`` = 0); it refuses a threshold below a majority
   of them, Shamir-shares its mask seed ``b`` and its key-agreement secret key
   (threshold ``t``), sends each share encrypted for its neighbour (the server only
   forwards ciphertexts) and publishes a SHA-256 digest of every share and of ``b``.
2. **open**: each node gets the ciphertexts addressed to it and opens them; a sender
   whose ciphertext does not decrypt or verify is refused, and the server drops it
   before anyone masks with it.
3. **collect**: each node is told whom to mask with (neighbours whose shares it holds)
   and sends ``q(update) + PRG(b) + sum +-PRG(s_ij) mod 2^32``.
4. **unmask**: each survivor gets which neighbours survived and which dropped after
   sharing keys; it returns shares of ``b`` for survivors and of the secret key for the
   dropped, never both for one node. Each share is checked against its owner's digest,
   each rebuilt secret against its commitment; the server removes the self masks and
   the dropped nodes' pairwise masks: what is left is the sum, range-checked.

After every stage at least max(t, the configured minimum, 3) nodes must be left, or the
round fails (``RoundFailedError``; the round loop counts it and goes on).

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
    RangeError,
    add_signed,
    digest,
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
TRAIN, SHARE, OPEN, COLLECT, UNMASK = "train", "share-keys", "open", "collect", "unmask"
#: the only stage order a client obeys
NEXT = {TRAIN: SHARE, SHARE: OPEN, OPEN: COLLECT, COLLECT: UNMASK}
#: fewer clients than this in a round and the sum would tell each of them the others'
MIN_CLIENTS = 3

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
    """t: ``wanted``, or a majority of the neighbourhood when 0; never below the floor
    every client enforces (``threshold_floor``: a majority, at least 2)."""
    t = wanted or neighbourhood // 2 + 1
    floor = threshold_floor(neighbourhood)
    if not floor <= t <= neighbourhood:
        raise ConfigError(f"{THRESHOLD_SETTING} = {wanted} does not fit a neighbourhood "
                          f"of {neighbourhood} nodes; allowed {floor} .. {neighbourhood} "
                          "(0: a majority; clients refuse less than a majority)")
    return t


class SecureRoundFailed(RoundFailedError):
    """A secure round that releases nothing; ``kind`` says why in words that name no
    client (what a round record may publish, under DP too)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def failure_kind(err: RoundFailedError) -> str:
    return getattr(err, "kind", "too few sampled")


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
REPLY_KEYS = {TRAIN: {"pk1", "pk2"},
              SHARE: {"destinations", "ciphertexts", "digests", "seed-digest"},
              OPEN: {"rejected"}, COLLECT: {"masked"}, UNMASK: {"nodes", "shares"}}

#: the setting a too-low threshold comes from (a refusal names it)
THRESHOLD_SETTING = "privacy.secagg_threshold"


def threshold_floor(key_sharing_nodes: int) -> int:
    """The lowest threshold a client deals its secrets with: a majority of the nodes it
    shares keys with, and never below 2 (with t = 1 a Shamir share is the secret)."""
    return max(2, key_sharing_nodes // 2 + 1)


def threshold_refusal(message: Message) -> str | None:
    """Why a client does not train for a secure round whose threshold is below 2 (the
    neighbourhood is not known yet: the majority is checked when the keys come)."""
    record = message.content.config_records.get(SECAGG)
    if record is None:
        return None
    try:
        t = int(record["threshold"])
    except (KeyError, TypeError, ValueError):
        return f"secure aggregation without a valid threshold ({THRESHOLD_SETTING})"
    if t < 2:
        return (f"{THRESHOLD_SETTING} = {t} is below 2: with one share a Shamir share is "
                "the secret, and the server could unmask this client's update")
    return None


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
    refusal = threshold_refusal(message)
    if refusal is not None:
        raise ValueError(f"secure aggregation refused: {refusal}")
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
    """Stages 1-4 on the client, in order only; anything else is refused."""
    record = message.content.config_records[SECAGG]
    state = context.state.config_records.get(STATE)
    if state is None:
        raise ValueError("secure aggregation: a protocol step before any training")
    stage = str(record["stage"])
    if NEXT.get(str(state["stage"])) != stage:
        raise ValueError(f"secure aggregation: stage {stage!r} after {state['stage']!r}")
    step = {SHARE: _share_keys, OPEN: _open_shares, COLLECT: _masked_vector,
            UNMASK: _unmask}[stage]
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
    if t < threshold_floor(len(nodes)):
        raise ValueError(f"secure aggregation refused: {THRESHOLD_SETTING} = {t} is below "
                         f"{threshold_floor(len(nodes))}, a majority of the {len(nodes)} "
                         "nodes this client shares keys with (fewer colluders than that "
                         "could rebuild its secrets)")
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
    # what the server checks the shares it is handed at unmask against (one per node of
    # ``nodes``, in that order) and the seed they must rebuild
    digests = [digest(a) + digest(b) for a, b in zip(seed_shares, key_shares, strict=True)]
    return {"destinations": destinations, "ciphertexts": ciphertexts, "digests": digests,
            "seed-digest": digest(seed)}


def _open_share(state: ConfigRecord, source: int, text: bytes) -> tuple[bytes, bytes]:
    """(seed share, key share) that ``source`` dealt this client; ValueError when the
    ciphertext does not decrypt or says another sender or receiver."""
    me, nodes = int(state["node"]), [int(n) for n in state["nodes"]]
    sk2 = bytes_to_private_key(bytes(state["sk2"]))
    try:
        channel = generate_shared_key(sk2, bytes_to_public_key(
            bytes(state["pk2s"][nodes.index(source)])))
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(
            decrypt(channel, bytes(text)))
    except Exception as err:  # noqa: BLE001 - any malformed ciphertext is the sender's
        raise ValueError(f"undecryptable shares ({type(err).__name__})") from None
    if (sender, receiver) != (source, me):
        raise ValueError(f"shares addressed from {sender} to {receiver}")
    return seed_share, key_share


def _open_shares(state: ConfigRecord, record: ConfigRecord, context: Context
                 ) -> dict[str, Any]:
    """Open the shares the neighbours dealt this client. One whose ciphertext does not
    decrypt or names another sender or receiver is a dropout for this client (listed in
    ``rejected``: the server drops it before anyone masks with it), never a crash."""
    me = int(state["node"])
    nodes = [int(n) for n in state["nodes"]]
    sources, texts = [int(s) for s in record["sources"]], list(record["ciphertexts"])
    if len(set(sources)) != len(sources) or me in sources or len(sources) != len(texts):
        raise ValueError("secure aggregation: repeated sources, or shares from myself")
    strangers = [s for s in sources if s not in nodes]
    if strangers:
        raise ValueError(f"secure aggregation: shares from {len(strangers)} nodes that are "
                         "not my neighbours")
    holders, seed_shares, key_shares = list(state["holders"]), list(state["seed-shares"]), \
        list(state["key-shares"])
    rejected = []
    for source, text in zip(sources, texts, strict=True):
        try:
            seed_share, key_share = _open_share(state, source, bytes(text))
        except ValueError as err:
            log.warning("secure aggregation: the shares from node %s are refused: %s",
                        source, err)
            rejected.append(source)
            continue
        holders.append(source)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    state.update({"holders": holders, "seed-shares": seed_shares, "key-shares": key_shares})
    return {"rejected": rejected}


def _masked_vector(state: ConfigRecord, record: ConfigRecord, context: Context
                   ) -> dict[str, Any]:
    """The masked vector, with a pairwise mask for each neighbour the server lists: only
    neighbours whose shares this client holds (it could not help remove the masks of
    another), and at least the threshold of them with itself."""
    me, t = int(state["node"]), int(state["threshold"])
    nodes, pk1s = [int(n) for n in state["nodes"]], list(state["pk1s"])
    holders = [int(n) for n in state["holders"]]
    sources = [int(s) for s in record["sources"]]
    if len(set(sources)) != len(sources) or me in sources or not set(sources) <= set(holders):
        raise ValueError("secure aggregation: masks asked with nodes whose shares I do not "
                         "hold, repeated, or with myself")
    if len(sources) + 1 < t:
        raise ValueError(f"secure aggregation: masks with {len(sources)} neighbours, fewer "
                         f"than the threshold {t} less myself")
    sk1 = bytes_to_private_key(bytes(state["sk1"]))
    pair_secrets = {source: generate_shared_key(
        sk1, bytes_to_public_key(pk1s[nodes.index(source)])) for source in sources}
    quantized = context.state.array_records[VECTOR]["q"].numpy()
    masked = mask_vector(quantized, bytes(state["seed"]), me, pair_secrets)
    del context.state[VECTOR]
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


#: the type of every value a protocol reply carries (bytes, or a list of bytes or ints)
_REPLY_TYPES = {"pk1": bytes, "pk2": bytes, "seed-digest": bytes, "masked": bytes,
                "ciphertexts": [bytes], "digests": [bytes], "shares": [bytes],
                "destinations": [int], "rejected": [int], "nodes": [int]}


def _well_formed(value: Any, key: str) -> bool:
    """A reply value of its key's type (an int where bytes belong would be read as a
    length by ``bytes()``)."""
    kind = _REPLY_TYPES[key]
    if isinstance(kind, list):
        return isinstance(value, list) and all(
            isinstance(v, kind[0]) and not isinstance(v, bool) for v in value)
    return isinstance(value, kind)


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
            if record is None or not all(_well_formed(record.get(k), k) for k in needed):
                self._lose(node, stage, f"reply without well-formed {', '.join(needed)}")
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


def _enough(live: set[int], graph: Mapping[int, list[int]], t: int, floor: int, stage: str
            ) -> None:
    """RoundFailedError unless at least ``floor`` nodes are left (the threshold, the
    configured minimum and never fewer than ``MIN_CLIENTS``) and each has ``t`` live
    neighbours: with fewer, the sum would tell the few what the others sent."""
    if len(live) < floor:
        raise SecureRoundFailed(f"too few after {stage}",
                                f"secure aggregation: after {stage}, {len(live)} nodes are "
                                f"left, fewer than the {floor} the round needs (threshold "
                                f"{t}, the configured minimum, and never fewer than "
                                f"{MIN_CLIENTS})")
    short = [n for n in live if len(set(graph[n]) & live) < t]
    if short:
        raise SecureRoundFailed(f"too few after {stage}",
                                f"secure aggregation: after {stage}, {len(short)} nodes have "
                                f"fewer than the threshold {t} of live neighbours")


@dataclass
class _Commitments:
    """What each owner published at share-keys: a digest of every share it dealt (by
    holder) and of its seed; its secret key's is its public key."""

    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # owner -> holder -> 64 B
    seeds: dict[int, bytes] = field(default_factory=dict)


def run_protocol(send: Send, messages: list[Message], server_round: int, neighbours: int,
                 wanted_threshold: int, settings: SecAggSettings, size: int,
                 minimum: int = MIN_CLIENTS, private: bool = False) -> SecureSum:
    """Stages 0-3 for ``messages`` (the round's train messages, without the protocol's
    record); the sum of the vectors (``size`` words each) of the nodes that lasted.
    RoundFailedError when, after any stage, fewer than max(threshold, ``minimum``,
    ``MIN_CLIENTS``) nodes are left, or the shares do not rebuild what was committed."""
    nodes = [m.metadata.dst_node_id for m in messages]
    graph = neighbourhoods(nodes, neighbours)
    t = threshold_for(len(next(iter(graph.values()))), wanted_threshold)
    settings = dataclasses.replace(settings, threshold=t)
    outcome = SecureSum(np.zeros(size, dtype="<u4"), [])
    try:
        return _stages(send, messages, server_round, graph, t, max(t, minimum, MIN_CLIENTS),
                       settings, outcome, private)
    except RoundFailedError as err:
        err.outcome = outcome  # type: ignore[attr-defined]  # who was lost, and why
        raise


def _stages(send: Send, messages: list[Message], server_round: int,
            graph: Mapping[int, list[int]], t: int, floor: int, settings: SecAggSettings,
            outcome: SecureSum, private: bool = False) -> SecureSum:
    size = outcome.total.size
    exchange = _Exchange(send, outcome, server_round, private)
    for m in messages:
        m.content[SECAGG] = ConfigRecord(settings.to_config())
    keyed = exchange(TRAIN, messages, ("pk1", "pk2"))
    outcome.train_replies = dict(keyed)
    live = set(keyed)
    _enough(live, graph, t, floor, TRAIN)
    pks = {n: (bytes(r.content.config_records[SECAGG]["pk1"]),
               bytes(r.content.config_records[SECAGG]["pk2"])) for n, r in keyed.items()}
    peers = {n: [p for p in graph[n] if p in live] for n in sorted(live)}
    shared = exchange(SHARE, [_stage_message(n, server_round, {
        "stage": SHARE, "nodes": peers[n], "pk1s": [pks[p][0] for p in peers[n]],
        "pk2s": [pks[p][1] for p in peers[n]]}) for n in sorted(live)],
        ("destinations", "ciphertexts", "digests", "seed-digest"))
    commitments = _commitments(shared, peers, exchange)
    live = set(commitments.seeds)
    _enough(live, graph, t, floor, SHARE)
    mail = _mailboxes({n: shared[n] for n in live}, graph)
    opened = exchange(OPEN, [_stage_message(n, server_round, {
        "stage": OPEN, "sources": [s for s, _ in mail[n]],
        "ciphertexts": [c for _, c in mail[n]]}) for n in sorted(live)], ("rejected",))
    accepted = _accepted(opened, mail, exchange)
    live = set(accepted)
    _enough(live, graph, t, floor, OPEN)
    keyed_set = set(live)  # nodes whose shares are out: their masks are in others' vectors
    masked = exchange(COLLECT, [_stage_message(n, server_round, {
        "stage": COLLECT, "sources": sorted(accepted[n])}) for n in sorted(live)],
        ("masked",))
    vectors = _vectors(masked, size, exchange)
    live = set(vectors)
    _enough(live, graph, t, floor, COLLECT)
    dead = keyed_set - live
    asked = {n: {"active": [p for p in graph[n] if p in live and (p == n or p in accepted[n])],
                 "dead": [p for p in graph[n] if p in dead and p in accepted[n]]}
             for n in sorted(live)}
    unmasked = exchange(UNMASK, [_stage_message(n, server_round, {"stage": UNMASK, **ask})
                                 for n, ask in asked.items()], ("nodes", "shares"))
    shares = _shares(unmasked, asked, live | dead, commitments, exchange)
    total = modular_sum([vectors[n] for n in sorted(live)])
    outcome.total = _remove_masks(total, shares, live, dead, accepted, pks, commitments, t)
    outcome.survivors = sorted(live)
    return outcome


def _commitments(shared: Mapping[int, Message], peers: Mapping[int, list[int]],
                 exchange: _Exchange) -> _Commitments:
    """Each owner's digests by holder (the order of the node list it was sent); a node
    whose reply does not deal exactly one share to each of its neighbours is lost (a
    missing one would leave a pairwise mask in the sum that nobody can remove)."""
    out = _Commitments()
    for node, reply in shared.items():
        record = reply.content.config_records[SECAGG]
        digests = [bytes(d) for d in record["digests"]]
        destinations = [int(d) for d in record["destinations"]]
        others = [p for p in peers[node] if p != node]
        if (sorted(destinations) != sorted(others) or len(record["ciphertexts"]) !=
                len(destinations) or len(digests) != len(peers[node]) or
                any(len(d) != 64 for d in digests) or len(bytes(record["seed-digest"])) != 32):
            exchange._lose(node, SHARE, "shares not dealt to exactly its neighbours, or "
                                        "malformed digests")
            continue
        out.shares[node] = dict(zip(peers[node], digests, strict=True))
        out.seeds[node] = bytes(record["seed-digest"])
    return out


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


def _accepted(opened: Mapping[int, Message], mail: Mapping[int, list[tuple[int, bytes]]],
              exchange: _Exchange) -> dict[int, set[int]]:
    """node -> the neighbours whose shares it opened, for the nodes still in: a node
    whose shares some neighbour could not open is out before anyone masks with it (so
    its masks need no rebuilding); a lying neighbour can push an honest node out, not
    learn anything of it."""
    accepted: dict[int, set[int]] = {}
    refused: set[int] = set()
    for node, reply in opened.items():
        offered = {s for s, _ in mail[node]}
        rejected = {int(s) for s in reply.content.config_records[SECAGG]["rejected"]} & offered
        accepted[node] = offered - rejected
        refused |= rejected
    for node in sorted(refused & set(accepted)):
        exchange._lose(node, OPEN, "a neighbour could not open the shares it sent")
    live = set(accepted) - refused
    return {n: a & live for n, a in accepted.items() if n in live}


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
            owners: set[int], commitments: _Commitments, exchange: _Exchange
            ) -> dict[int, list[bytes]]:
    """owner -> the shares of its secret the survivors sent; only those each was asked
    for (a share of the other kind would spoil the reconstruction), each checked against
    the digest its owner published. A holder that sends one share that does not match
    (or one twice) is lost at unmask (all its shares are set aside; its vector stays
    in the sum)."""
    shares: dict[int, list[bytes]] = {n: [] for n in owners}
    for holder, reply in sorted(unmasked.items()):
        record = reply.content.config_records[SECAGG]
        seeds, keys_of = set(asked[holder]["active"]), set(asked[holder]["dead"])
        sent = list(zip(record["nodes"], record["shares"], strict=False))
        good = [(int(o), bytes(s)) for o, s in sent if _verified(
            int(o), holder, bytes(s), int(o) in seeds, commitments)
            and (int(o) in seeds or int(o) in keys_of)]
        if len(good) != len(sent) or len(sent) != len(record["shares"]) or \
                len(sent) != len(record["nodes"]) or len({o for o, _ in good}) != len(good):
            exchange._lose(holder, UNMASK, "a share that does not match its owner's digest")
            continue
        for owner, share in good:
            shares[owner].append(share)
    return shares


def _verified(owner: int, holder: int, share: bytes, of_seed: bool,
              commitments: _Commitments) -> bool:
    published = commitments.shares.get(owner, {}).get(holder)
    if published is None:
        return False
    return digest(share) == (published[:32] if of_seed else published[32:])


def _rebuild(shares: list[bytes], t: int, what: str) -> bytes:
    """The secret from its verified shares; RoundFailedError when too few, or when they
    do not combine (an owner that dealt inconsistent shares)."""
    if len(shares) < t:
        raise SecureRoundFailed("shares", f"secure aggregation: {len(shares)} valid shares "
                                f"of {what}, fewer than the threshold {t}")
    try:
        return combine_shares(shares)
    except Exception as err:  # noqa: BLE001 - pycryptodome's unpad and length errors
        raise SecureRoundFailed("shares", f"secure aggregation: the shares of {what} do "
                                f"not combine ({type(err).__name__})") from None


def _remove_masks(total: np.ndarray, shares: Mapping[int, list[bytes]], live: set[int],
                  dead: set[int], accepted: Mapping[int, set[int]],
                  pks: Mapping[int, tuple[bytes, bytes]], commitments: _Commitments, t: int
                  ) -> np.ndarray:
    """The sum without the survivors' self masks and the dropped nodes' pairwise masks;
    each rebuilt secret is checked against what its owner committed to (the digest of
    its seed, its public key), so a bad share fails the round instead of corrupting it."""
    for node in sorted(live):
        seed = _rebuild(shares[node], t, "a survivor's seed")
        if digest(seed) != commitments.seeds[node]:
            raise SecureRoundFailed("shares", "secure aggregation: a survivor's seed shares "
                                    "rebuild a seed other than the one it committed to")
        total = add_signed(total, self_mask(seed, total.size), -1)
    for node in sorted(dead):
        secret = _rebuild(shares[node], t, "a dropped node's key")
        try:
            secret_key = bytes_to_private_key(secret)
            ok = public_key_to_bytes(secret_key.public_key()) == pks[node][0]
        except Exception:  # noqa: BLE001 - not a key at all
            ok = False
        if not ok:
            raise SecureRoundFailed("shares", "secure aggregation: a dropped node's key "
                                    "shares rebuild a key other than its public key")
        for other in sorted(live):  # ``other`` added sign(other, node) * PRG(s): take it back
            if node in accepted[other]:
                pair = generate_shared_key(secret_key, bytes_to_public_key(pks[other][0]))
                total = add_signed(total, pair_mask(pair, total.size), -pair_sign(other, node))
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
    minimum, _ = strategy.population.minimum_replies()
    outcome = run_protocol(send, messages, server_round, p.secagg_neighbours,
                           p.secagg_threshold, settings, size, minimum,
                           private=strategy.dp is not None)
    try:
        summed = checked_sum(outcome, settings, entries,
                             strategy.scenario.federation.max_update_norm)
    except RoundFailedError as err:
        err.outcome = outcome  # type: ignore[attr-defined]
        raise
    start = time.perf_counter()
    update = _summed_update(strategy, outcome.survivors, summed, settings)
    if strategy.dp is None:
        strategy.global_adapter = strategy.aggregator.aggregate([update],
                                                                strategy.global_adapter)
    else:  # one equal part of the sum per survivor: the wrapper counts the noise shares
        strategy.global_adapter = strategy.dp_release(server_round,
                                              [update] * len(outcome.survivors))
    return _round_metrics(strategy, server_round, outcome, settings,
                          time.perf_counter() - start)


def checked_sum(outcome: SecureSum, settings: SecAggSettings,
                entries: list[tuple[str, tuple[int, int]]], max_update_norm: float) -> State:
    """The dequantised sum, if it is one the survivors could have sent: every coordinate
    within [-n R, n R] (a word past that is a client's forged value, e.g. 2^31 added to
    its masked vector) and the mean's norm within ``federation.max_update_norm``
    (0: no bound); else RoundFailedError and nothing is released."""
    n = len(outcome.survivors)
    try:
        settings.quantizer.check_sum(outcome.total, n)
    except RangeError as err:
        raise SecureRoundFailed("range check", f"secure aggregation: {err}") from None
    summed = settings.quantizer.dequantize_sum(outcome.total, n)
    norm = float(np.linalg.norm(summed / n))
    if max_update_norm > 0 and norm > max_update_norm:
        raise SecureRoundFailed("max_update_norm", f"secure aggregation: the mean update's "
                                f"norm {norm:.4g} exceeds federation.max_update_norm = "
                                f"{max_update_norm:g}")
    return vector_to_state(summed, entries)


def failed_round(strategy: Any, server_round: int, err: RoundFailedError) -> MetricRecord:
    """A secure round that could not release its sum: the global adapter stays (under DP
    the round releases noise only and is charged, as a round with too few clients is:
    the server may have seen the noised sum before it was refused); the run goes on."""
    log.warning("round %d failed: %s", server_round, err)
    outcome = getattr(err, "outcome", None)
    if outcome is not None:
        _count_losses(strategy, outcome)
    metrics: dict[str, Any] = {"num-clients": 0, "seconds-aggregate": 0.0,
                               "secagg-failed": 1}
    if strategy.dp is not None:
        strategy.global_adapter = strategy.dp_release(server_round, [])
        metrics.update({k.replace("_", "-"): float(v)
                        for k, v in strategy.dp.metrics().items()})
    else:
        strategy.stats.dropped.append(f"round failed: {err}")
    return MetricRecord(metrics)


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


def _count_losses(strategy: Any, outcome: SecureSum) -> None:
    """Who the protocol lost and why, and its bytes, into the round's stats."""
    stats, private = strategy.stats, strategy.dp is not None
    stats.dropped.extend(f"{'a sampled client' if private else f'node {n}'}: secure "
                         f"aggregation, {why}" for n, why in sorted(outcome.dropped.items()))
    stats.bytes_up += sum(outcome.bytes_up.values())
    stats.bytes_down += sum(outcome.bytes_down.values())


def _round_metrics(strategy: Any, server_round: int, outcome: SecureSum,
                   settings: SecAggSettings, seconds: float) -> MetricRecord:
    """Like ``FedtuneStrategy.aggregate_train``'s, from the survivors' stage-0 metrics;
    each client's record counts the bytes of all the stages."""
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
    _count_losses(strategy, outcome)
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
