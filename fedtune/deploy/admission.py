"""What the clients' front checks before a request's body goes to the SuperLink: the
node-authentication headers, and each node's byte budget for one message.

flwr 1.41's SuperLink reads a whole request body before it checks who sent it, so a
check there costs the server the body first. Its Fleet REST routes carry node
authentication in three headers (``flwr.supernode.node_auth_http_interceptor``): the
node's public key, an ISO timestamp and the key's signature of that timestamp. The
front checks them against the keys the SuperLink has registered, with Flower's own
verification and time window, from the headers alone: an outsider's request is refused
before one byte of its body is read. The SuperLink still checks every request itself
(the signature, and that the key owns the node id the body names).

A reply message is pushed as many objects (``push-messages`` announces the message and
its object tree, then one ``push-object`` per object), each under the request cap, so
no single request bounds a message. The front counts what each node pushes after the
SuperLink accepts one of its replies and refuses past :func:`reply_budget`, the largest
reply this federation's clients can honestly produce.
"""

from __future__ import annotations

import asyncio
import binascii
import datetime
import hashlib
import logging
import math
import time
from base64 import b64decode
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

if TYPE_CHECKING:
    from fedtune.config import Scenario

log = logging.getLogger("fedtune")

#: how often an unknown key may make the front ask the SuperLink for its registered keys
#: again (``fedtune keys add`` registers keys there while the server runs)
KEY_REFRESH_INTERVAL = 2.0
UNKNOWN_KEY = "a key that is not registered"


class Refused(Exception):
    """A request the front answers itself: ``status`` and a reason for the log."""

    def __init__(self, status: int, reason: str, always_logged: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.always_logged = always_logged


class NodeAuth:
    """The registered node keys (as Flower's bytes) and the header check against them.

    ``registered`` lists the keys the SuperLink accepts now; it is called (in a worker
    thread) at most every KEY_REFRESH_INTERVAL seconds, when a request carries a key the
    front does not know yet. A SuperNode refused with 401 stops for good, so a key is
    refused as unknown only after a listing that succeeded: while the SuperLink cannot
    be asked, unknown keys get a 503 (SuperNodes retry those)."""

    def __init__(self, registered: Callable[[], Iterable[bytes]],
                 keys: Iterable[bytes] = ()) -> None:
        self.registered = registered
        self.keys = frozenset(keys)
        self.refreshed_at = -math.inf
        self.listed = False  # whether the latest listing succeeded
        self.lock: asyncio.Lock | None = None  # made on the front's event loop

    def refresh_due(self) -> bool:
        return time.monotonic() - self.refreshed_at >= KEY_REFRESH_INTERVAL

    def _reload(self) -> None:
        try:
            self.keys = frozenset(self.registered())
            self.listed = True
        except Exception as err:  # noqa: BLE001 - keep the keys known so far
            self.listed = False
            log.warning("front: could not list the registered node keys: %s", err)

    async def authenticate(self, headers: dict[str, str]) -> bytes:
        """``check``, asking the SuperLink for its keys again first when the key is
        unknown and the last listing is old enough (one listing at a time: a request
        that arrives during one waits for it)."""
        try:
            return self.check(headers)
        except Refused as refusal:
            if refusal.reason != UNKNOWN_KEY:
                raise
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            if self.refresh_due():
                self.refreshed_at = time.monotonic()
                await asyncio.to_thread(self._reload)
        try:
            return self.check(headers)
        except Refused as refusal:
            if refusal.reason == UNKNOWN_KEY and not self.listed:
                raise Refused(503, "a key the front could not look up yet") from None
            raise

    def check(self, headers: dict[str, str]) -> bytes:
        """The node's public key, once its headers prove it holds a registered key;
        ``Refused`` (401) otherwise. Unknown keys are refused before any signature
        is verified, so an outsider costs a set lookup."""
        try:
            public_key = b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER], validate=True)
            signature = b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER], validate=True)
            timestamp = headers[TIMESTAMP_HEADER]
        except (KeyError, binascii.Error, ValueError):
            raise Refused(401, "no node-authentication headers") from None
        if public_key not in self.keys:
            raise Refused(401, UNKNOWN_KEY)
        try:
            age = (datetime.datetime.now(datetime.UTC)
                   - datetime.datetime.fromisoformat(timestamp)).total_seconds()
        except (ValueError, TypeError):
            raise Refused(401, "an unreadable timestamp") from None
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            raise Refused(401, f"a timestamp {age:.0f} s old")
        try:
            valid = verify_signature(bytes_to_public_key(public_key),
                                     timestamp.encode("ascii"), signature)
        except (ValueError, TypeError, UnicodeError):
            valid = False
        if not valid:
            raise Refused(401, "an invalid signature")
        return public_key


def registered_key_bytes(address: str, ca_cert: str | None) -> set[bytes]:
    """The keys the SuperLink at ``address`` (its loopback Control API) lets join now."""
    from fedtune.deploy.control import list_node_keys, parse_public_key

    found = set()
    for node in list_node_keys(address, ca_cert):
        try:
            found.add(parse_public_key(node.public_key, f"node {node.node_id}'s key"))
        except Exception:  # noqa: BLE001 - a key Flower stored in another form
            continue
    return found


@dataclass(frozen=True)
class ReplyBudget:
    """The most bytes one node may push for one message, and how it was derived."""

    limit: int
    derivation: str


#: bytes per LoRA parameter in the widest reply fedtune sends: dense fp32 values (and
#: SecAgg's 32-bit words) are 4; a sparse upload adds at most one bitmask bit per entry;
#: the rest covers Flower's per-object headers and the .npy headers of each array
WIDEST_BYTES_PER_PARAMETER = 5
#: metrics, the client's identity and profile text, SecAgg's key shares (per client)
METRICS_MARGIN = 1 << 20
PER_CLIENT_MARGIN = 4 << 10


def reply_budget(scenario: Scenario) -> ReplyBudget:
    """The largest reply a client of ``scenario`` can produce, with a margin: its LoRA
    factors at the highest rank any client can be assigned (a deployed client may
    declare a device profile, whose rank is capped at min(in, out) of the adapted
    modules: ``planning.profiles.resolve_profile``), in the widest encoding, plus the
    metrics and protocol records that travel with them."""
    from fedtune.model.memory import lora_params, model_dims

    dims = model_dims(scenario.model.source)
    targets = tuple(scenario.lora.target_modules)
    rank = max(dims.max_rank(targets), scenario.lora.rank)
    params = lora_params(dims, rank, targets)
    margin = METRICS_MARGIN + PER_CLIENT_MARGIN * scenario.data.num_clients
    limit = params * WIDEST_BYTES_PER_PARAMETER + margin
    return ReplyBudget(limit, (
        f"{params:,} LoRA parameters at rank {rank} (the highest a client of "
        f"{scenario.model.source!r} on {list(targets)} can be assigned) x "
        f"{WIDEST_BYTES_PER_PARAMETER} bytes + {margin:,} bytes of metrics"))


class MessageBudget:
    """Bytes each node pushed since the SuperLink last accepted a reply of it.

    A node is whatever :func:`node_key` names (its public key with node
    authentication). Nodes the front has never seen start with one budget; the table
    keeps the most recent ``max_nodes`` nodes."""

    def __init__(self, budget: ReplyBudget, max_nodes: int = 4096) -> None:
        self.budget = budget
        self.used: OrderedDict[object, int] = OrderedDict()
        self.refused: set[object] = set()  # nodes refused since their last new message
        self.max_nodes = max_nodes

    def new_message(self, node: object) -> None:
        """The SuperLink accepted a reply of ``node`` and asked for its objects."""
        self.used[node] = 0
        self.refused.discard(node)
        self.used.move_to_end(node)
        while len(self.used) > self.max_nodes:
            self.refused.discard(self.used.popitem(last=False)[0])

    def charge(self, node: object, size: int) -> None:
        """Count ``size`` more bytes of ``node``'s message; ``Refused`` (413) past the
        budget (nothing is counted then)."""
        used = self.used.get(node, 0)
        if used + size > self.budget.limit:
            first = node not in self.refused  # logged once per message, then rate-limited
            self.refused.add(node)
            raise Refused(413, (
                f"node {describe_node(node)} pushed {used + size:,} bytes for one message, "
                f"over its budget of {self.budget.limit:,} bytes "
                f"({self.budget.derivation})"), always_logged=first)
        self.used[node] = used + size
        self.used.move_to_end(node)


def describe_node(node: object) -> str:
    """A node key as the log names it: a public key by the start of its SHA-256."""
    if isinstance(node, bytes):
        return f"with key sha256:{hashlib.sha256(node).hexdigest()[:16]}"
    return str(node)


def node_key(public_key: bytes | None, peer: str, body_prefix: bytes) -> object:
    """Who a push counts against: the authenticated key, else the peer address and the
    node id the request's body names (any node may claim any id without node
    authentication: there, the budget bounds a message, not a peer)."""
    if public_key is not None:
        return public_key
    return f"{peer}/node {leading_node_id(body_prefix)}"


def leading_node_id(data: bytes) -> int | None:
    """``node.node_id`` of a Fleet request whose field 1 is its ``Node`` (PushObject and
    PushMessages requests), read from the first bytes of its protobuf encoding alone, so
    that a body being streamed need not be held; None when they do not start so."""
    try:
        tag, at = _varint(data, 0)
        if tag != (1 << 3) | 2:  # field 1, length-delimited
            return None
        length, at = _varint(data, at)
        inner = data[at:at + length]
        tag, at = _varint(inner, 0)
        if tag != (1 << 3) | 0:  # Node.node_id, a varint
            return None
        return _varint(inner, at)[0]
    except IndexError:
        return None


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")
