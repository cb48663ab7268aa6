"""Checks on one client's reply (train or evaluate), as pure functions (no Grid, no state).

A client the federation admitted can still send anything, so a reply must cost the
server at most about its own size, and no more influence than an honest client has:
nothing it declares (tensor shapes, element counts, number of examples) is believed
before it is compared with what the server knows itself: the base model's adapted
modules (from its config) and the rank the server assigned. Shapes are checked before
anything of the declared size is allocated. The strategy runs these in order and drops
the reply, with the reason, on the first exception of any type (:func:`drop_reason`).
:func:`train_update` is the whole path from one train reply to a ClientUpdate.
What a well-formed reply can still do, send a huge update or claim the example cap, is
bounded per round before aggregation by ``fedtune.aggregation.influence`` (a multiple
of the round's median norm and count; under client-level DP the DP clip).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import Tensor

from fedtune.aggregation.fedsb import expand_latent, latent_module
from fedtune.aggregation.start import client_start, sliced_like
from fedtune.core.adapters import ClientUpdate, LoraFactors, LoraMask
from fedtune.core.codec import A_SUFFIX, B_SUFFIX, CodecError, factors_from_state_dict, module_name
from fedtune.core.compress import Decoded, decode_state
from fedtune.core.init import seeded_latent_basis, seeded_lora_state
from fedtune.flower import messages as keys
from fedtune.planning.client_settings import ClientSettings

#: peft's prefix of the base model's module paths in an adapter state dict
PEFT_PREFIX = "base_model.model."
#: the dtype of every dense adapter tensor on the wire (``messages.state_to_record``)
WIRE_DTYPE = np.dtype("<f4")
NUMPY_STYPE = "numpy.ndarray"


@functools.lru_cache(maxsize=8)
def _modules(source: str, targets: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    from fedtune.model.memory import adapted_modules, model_dims

    shapes = adapted_modules(model_dims(source), targets)
    return tuple((PEFT_PREFIX + path, i, o) for path, (i, o) in sorted(shapes.items()))


def expected_modules(source: str, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """peft module name -> (in, out) of every module the federation adapts, from the base
    model's config alone (no weights; ``fedtune.model.memory.model_dims``). Never from a
    reply: the first reply would otherwise set the shapes every other client is held to,
    and a malicious first reply would get every honest one rejected."""
    return {name: (i, o) for name, i, o in _modules(source, tuple(targets))}


@dataclass(frozen=True)
class ShapeRule:
    """The tensors one client's reply may declare: a LoRA factor of an adapted module,
    ``A`` (rank, in) and ``B`` (out, rank), at the rank the server assigned it (or a
    smaller one when HetLoRA self-pruning is on). The decoders call it with each
    tensor's declared shape before reading or allocating that tensor, so a reply can
    never make the server hold more than the honest adapter (see ``decode_state``)."""

    modules: Mapping[str, tuple[int, int]]
    rank: int
    pruning: bool = False

    def __call__(self, key: str, shape: tuple[int, ...]) -> None:
        name = module_name(key)  # CodecError for a key that is no LoRA factor
        if name not in self.modules:
            raise CodecError(f"module names differ from the base model's: {name!r} is not "
                             "an adapted module")
        if len(shape) != 2:
            raise CodecError(f"{key}: {len(shape)} dimensions, expected 2")
        inp, out = self.modules[name]
        is_a = key.endswith(A_SUFFIX)
        rank = shape[0] if is_a else shape[1]
        if rank != self.rank and not (self.pruning and 1 <= rank < self.rank):
            raise CodecError(f"{key}: {shape[0]}x{shape[1]}, rank {rank} instead of the "
                             f"assigned rank {self.rank}")
        want = (rank, inp) if is_a else (out, rank)
        if tuple(shape) != want:
            raise CodecError(f"module {name}: lora_{'A' if is_a else 'B'} is "
                             f"{shape[0]}x{shape[1]}, expected {want[0]}x{want[1]}")


def npy_header(array: Array, what: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of a Flower Array's ``.npy`` bytes, from the
    header alone, once the data's length is exactly what the header declares. Flower's
    own ``Array.numpy()`` (``np.load``) allocates the declared shape before it finds the
    data missing: 2**40 declared elements are a MemoryError on the server."""
    if array.stype != NUMPY_STYPE:
        raise CodecError(f"{what}: serialisation {array.stype!r}, expected {NUMPY_STYPE!r}")
    data = array.data
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran_order, dtype = read(stream)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad header
        raise CodecError(f"{what}: not a .npy array ({type(err).__name__}: {err})") from None
    shape = tuple(shape)
    if fortran_order or any(d < 0 for d in shape):
        raise CodecError(f"{what}: unsupported layout (shape {list(shape)}, "
                         f"fortran order {fortran_order})")
    if shape != tuple(array.shape):
        raise CodecError(f"{what}: the array says shape {list(array.shape)}, its data "
                         f"{list(shape)}")
    offset = stream.tell()
    if len(data) - offset != math.prod(shape) * dtype.itemsize:
        raise CodecError(f"{what}: {len(data) - offset} data bytes for a declared "
                         f"{list(shape)} {dtype} array")
    return shape, dtype, offset


def dense_tensor(array: Array, key: str, rule: ShapeRule) -> Tensor:
    """One tensor of a dense (per-tensor) reply, checked against ``rule`` first."""
    shape, dtype, offset = npy_header(array, key)
    rule(key, shape)
    if dtype != WIRE_DTYPE:
        raise CodecError(f"{key}: dtype {dtype}, expected float32")
    flat = np.frombuffer(array.data, dtype=WIRE_DTYPE, count=math.prod(shape), offset=offset)
    return torch.from_numpy(flat.reshape(shape).copy())


def packed_blob(array: Array) -> bytes:
    """The bytes of a packed reply's one uint8 array (header checked as above)."""
    shape, dtype, offset = npy_header(array, keys.PACKED)
    if len(shape) != 1 or dtype != np.dtype(np.uint8):
        raise CodecError(f"{keys.PACKED}: a {list(shape)} {dtype} array, expected 1-D uint8")
    return array.data[offset:]


def decode_adapter(record: ArrayRecord, rule: ShapeRule) -> Decoded:
    """A reply's adapter tensors (and, packed, the masks of entries sent), every declared
    shape held to ``rule`` before anything of that size is allocated."""
    if keys.is_packed(record):
        if len(record) != 1:
            raise CodecError(f"a packed adapter has one array, this one has {len(record)}")
        return decode_state(packed_blob(record[keys.PACKED]), rule)
    values = {key: dense_tensor(array, key, rule) for key, array in record.items()}
    return Decoded(values, dict.fromkeys(values))


#: the records a client's reply may hold (``messages.REPLY_RECORDS``, and the protocol
#: record of secure aggregation), and the one of them that may hold arrays
REPLY_RECORD_NAMES = keys.REPLY_RECORDS | {"secagg"}
ARRAY_RECORD_NAMES = frozenset({keys.ADAPTER})
#: room a reply gets beyond its adapter: metrics, identity, secure aggregation's keys
#: and shares, Flower's object headers
REPLY_MARGIN = 8 * 2**20


@dataclass(frozen=True)
class ReplyBudget:
    """What the server reads of one reply before it refuses it, checked while the reply
    is pulled: at most ``max_objects`` Flower objects of ``max_bytes`` together (0 = no
    bound), records only under ``records``, arrays only under ``array_records``."""

    max_bytes: int = 0
    max_objects: int = 0
    records: frozenset[str] = REPLY_RECORD_NAMES
    array_records: frozenset[str] = ARRAY_RECORD_NAMES


def reply_budget(modules: Mapping[str, tuple[int, int]], max_rank: int,
                 chunk: int = 5 * 2**20) -> ReplyBudget:
    """The budget of every reply of a federation whose clients train ``modules`` at
    ranks up to ``max_rank``: four times the dense fp32 adapter at that rank (the
    largest reply an honest client sends, whatever its codec: a packed update is
    smaller, a secure aggregation vector as large) plus :data:`REPLY_MARGIN`. Objects:
    each of the 2 arrays per module, in ``chunk``-byte chunks (Flower's), with slack."""
    dense = sum(max_rank * (inp + out) for inp, out in modules.values()) * WIRE_DTYPE.itemsize
    max_bytes = 4 * dense + REPLY_MARGIN
    arrays = 2 * len(modules)
    return ReplyBudget(max_bytes=max_bytes,
                       max_objects=16 + 2 * arrays + 2 * math.ceil(max_bytes / chunk))


def federation_reply_budget(source: str, targets: tuple[str, ...]) -> ReplyBudget:
    """:func:`reply_budget` at the largest rank the base model allows for its adapted
    modules (min(in, out); no client can be assigned more), from its config alone."""
    from fedtune.model.memory import model_dims

    return reply_budget(expected_modules(source, targets),
                        model_dims(source).max_rank(targets))


def check_reply_shape(children: Mapping[str, int], budget: ReplyBudget) -> None:
    """``children``: each record of a reply by name -> how many objects it holds. A
    record the reply may not carry, or arrays where none may be, refuse the reply
    before anything under them is read (an honest update plus a 1.5 GB extra record
    costs the server the record names only)."""
    unexpected = sorted(set(children) - budget.records)
    if unexpected:
        raise ValueError(f"reply carries records it may not: {unexpected[:3]} (a reply "
                         f"holds only {sorted(budget.records)})")
    with_arrays = sorted(n for n, count in children.items()
                         if count and n not in budget.array_records)
    if with_arrays:
        raise ValueError(f"reply carries arrays in {with_arrays[:3]}, where none may be")


def check_metrics(metrics: Mapping[str, Any]) -> None:
    """Every metric one number (as ``messages.check_outgoing`` makes honest clients send):
    the round's summaries call float() on them after the reply was accepted."""
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"metric {key!r} must be one number, got {type(value).__name__}")


def checked_examples(metrics: Mapping[str, Any], cap: int) -> int:
    """The reply's ``num-examples``: its weight in every weighted mean, and a number only
    the client knows. Above ``cap`` (``federation.max_examples``; 0 = no bound) the reply
    is dropped, not clamped: an honest client cannot exceed a cap set above its data, so
    such a claim is a lie or a misconfiguration, and clamping would keep a liar's update
    at the largest weight there is.

    The default cap, 100,000 packed sequences, is far above any client of the shipped
    scenarios (at most ~400, and ~16,000 for the whole Shakespeare corpus split between
    two clients at 128 bytes a sequence), so no honest client there is dropped, while an
    absurd claim (10**12) is. It bounds, it does not verify: a client can still claim
    the cap, so a deployment that knows its clients' sizes should set it near the largest.
    Within the cap, ``federation.median_weight_multiple`` then caps each count at a
    multiple of the round's median (``fedtune.aggregation.influence``).
    The server does not know the sizes itself even in simulation (they are counted in
    tokenised sequences of each client's own data), so one cap serves both."""
    value = metrics.get(keys.NUM_EXAMPLES, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"num-examples must be a number, got {value!r}")
    count = int(value)
    if count <= 0:
        raise ValueError(f"num-examples must be positive, got {count}")
    if cap and count > cap:
        raise ValueError(f"num-examples {count} exceeds federation.max_examples = {cap}")
    return count


def eval_token_cap(max_eval_sequences: int, max_examples: int, eval_fraction: float,
                   seq_len: int) -> int:
    """The most held-out tokens one honest evaluate reply can report (0 = no bound):
    its held-out sequences times ``seq_len``. The sequences are ``data.max_eval_sequences``
    when set (each client cuts its held-out blocks there), else ``federation.max_examples``
    scaled by eval_fraction / (1 - eval_fraction) when that is above 1 (a client's
    held-out part is that fraction of its data, packed the same way as its training
    blocks). The server cannot count a client's held-out blocks itself, not even in
    simulation: they are tokenised sequences of the client's own data (as for
    :func:`checked_examples`). A reply's token count is its weight in the round's
    held-out loss, so an unbounded one lets one client set that loss."""
    if max_eval_sequences:
        return max_eval_sequences * seq_len
    if not max_examples:
        return 0
    ratio = max(1.0, eval_fraction / (1.0 - eval_fraction))
    return math.ceil(max_examples * ratio) * seq_len


def eval_numbers(content: RecordDict, max_tokens: int = 0
                 ) -> tuple[float, int, dict[str, Any]]:
    """An evaluate reply's (loss, tokens, metrics): the loss finite and >= 0 (a mean
    cross-entropy), the token count a whole number >= 0 and at most ``max_tokens``
    (:func:`eval_token_cap`; 0 = no bound), every metric one number (the round's eval
    loss is their token-weighted mean)."""
    metrics = dict(content.metric_records[keys.METRICS])
    check_metrics(metrics)
    loss, tokens = metrics.get(keys.EVAL_LOSS), metrics.get(keys.EVAL_TOKENS)
    if loss is None or not math.isfinite(loss) or loss < 0:
        raise ValueError(f"eval-loss must be a finite number >= 0, got {loss!r}")
    if tokens is None or not math.isfinite(tokens) or tokens < 0 or tokens != int(tokens):
        raise ValueError(f"eval-tokens must be a whole number >= 0, got {tokens!r}")
    if max_tokens and tokens > max_tokens:
        raise ValueError(f"eval-tokens {int(tokens)} exceeds the {max_tokens} held-out tokens "
                         "a client can have (data.max_eval_sequences, or "
                         "federation.max_examples, times data.seq_len)")
    return float(loss), int(tokens), metrics


def reply_rank(factors: Mapping[str, LoraFactors], expected: Mapping[str, tuple[int, int]],
               rank: int, pruning: bool) -> int:
    """The reply's one rank, once it holds every adapted module at its (in, out): what the
    per-tensor :class:`ShapeRule` cannot see (a missing module, mixed ranks)."""
    if set(factors) != set(expected):
        unknown = sorted(set(factors) - set(expected))[:3]
        missing = sorted(set(expected) - set(factors))[:3]
        raise ValueError(f"module names differ (unknown {unknown}, missing {missing})")
    ranks = sorted({f.rank for f in factors.values()})
    if ranks != [rank] and not (pruning and len(ranks) == 1 and ranks[0] < rank):
        raise ValueError(f"rank {ranks} instead of the assigned rank {rank}")
    for name, f in factors.items():
        if (f.in_features, f.out_features) != expected[name]:
            raise ValueError(f"module {name} is {f.out_features}x{f.in_features}, expected "
                             f"{expected[name][1]}x{expected[name][0]}")
    return ranks[0]


def drop_reason(err: BaseException) -> str:
    """Why a reply was dropped: a ValueError's message as it is (the checks above say
    what was wrong), any other exception with its type (it escaped a decoder)."""
    if isinstance(err, ValueError):
        return str(err)
    return f"{type(err).__name__} while reading the reply: {err}"


def short_reason(reason: str | None, limit: int = 300) -> str:
    """The client's own exception message out of an engine's wrapped traceback."""
    text = reason or "unknown error"
    marker = "Message: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    text = text.strip().splitlines()[0] if text.strip() else text
    return text[:limit].rstrip("'>")


def update_norm(factors: Mapping[str, LoraFactors], start: Mapping[str, LoraFactors]) -> float:
    """L2 norm of a reply's move from where it started, over every factor it sent."""
    total = 0.0
    for name, f in factors.items():
        s = start[name]
        total += float((f.A - s.A[: f.rank]).pow(2).sum() + (f.B - s.B[:, : f.rank]).pow(2).sum())
    return math.sqrt(total)


def sent_masks(masks: Mapping[str, Tensor | None], factors: Mapping[str, LoraFactors]
               ) -> dict[str, LoraMask] | None:
    """Per module, which entries of A and B a packed reply actually carried; None when
    every tensor was sent dense (then it merges exactly like an uncompressed reply)."""
    out = {}
    for name, f in factors.items():
        a, b = masks.get(name + A_SUFFIX), masks.get(name + B_SUFFIX)
        if a is None and b is None:
            continue
        full = LoraMask.full(f)
        out[name] = LoraMask(A=full.A if a is None else a, B=full.B if b is None else b)
    return out or None


@dataclass(frozen=True)
class TrainRules:
    """What the server holds one round's train replies to, and what it needs to rebuild
    the start each client trained from (see :func:`client_start_state`)."""

    expected: Mapping[str, tuple[int, int]]  # module -> (in, out), from the base model
    run_seed: int
    client_mode: str  # the aggregator's: "continue" | "residual"
    flora_init: str
    max_examples: int = 0  # federation.max_examples (0 = no bound)
    max_update_norm: float = 0.0  # federation.max_update_norm (0 = no bound)
    pruning: bool = False  # HetLoRA self-pruning: a reply may have a smaller rank
    #: DP or TIES merging work on the update against its start: keep it on every reply
    keep_start: bool = False
    #: this round's train payload per (rank, alpha), before download compression
    sent: Mapping[tuple[int, float], Mapping[str, Tensor]] = field(default_factory=dict)
    #: client-level DP: a reply carries only its update (no loss, no example count)
    client_dp: bool = False
    #: sample-level DP alone: a reply carries its DP-SGD'd update, the expected example
    #: count and its epsilon, no loss (an un-noised number about its data)
    sample_dp: bool = False


def client_start_state(settings: ClientSettings, reply: Mapping[str, Tensor],
                       rules: TrainRules) -> dict[str, Tensor]:
    """The LoRA this client started training from, rebuilt exactly as the client built
    it (seeded init at its assigned rank, this round's payload), cut to the reply's
    rank. The payload is taken before download compression, so a compressed update
    lands on the server's full-precision global, not on the client's rounded copy."""
    shapes = {k: ((settings.rank, v.shape[1]) if k.endswith(A_SUFFIX)
                  else (v.shape[0], settings.rank)) for k, v in reply.items()}
    fresh = seeded_lora_state(rules.run_seed, shapes)
    payload = dict(rules.sent.get((settings.rank, settings.alpha), {}))
    try:
        trainable, _ = client_start(rules.client_mode, rules.flora_init, payload, fresh,
                                    settings.alpha / settings.rank, settings.rank)
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"reply does not fit the payload it was sent: {err}") from None
    return sliced_like(trainable, reply)


def train_metrics(content: RecordDict, max_examples: int, client_dp: bool = False,
                  sample_dp: bool = False) -> tuple[dict[str, Any], int]:
    """A train reply's metrics (every one a number, the loss finite) and its checked
    number of examples. Under client-level DP neither is required (a private client
    sends only its update; the release weighs every client equally): count 1. Under
    sample-level DP alone no loss is required (the count is the expected one)."""
    if keys.ADAPTER not in content.array_records:
        raise ValueError("reply has no adapter")
    record = content.metric_records.get(keys.METRICS)
    if record is None and not client_dp:
        raise ValueError("reply has no metrics")
    metrics = dict(record or {})
    check_metrics(metrics)
    if client_dp:
        return metrics, 1
    if sample_dp:
        return metrics, checked_examples(metrics, max_examples)
    loss = metrics.get(keys.TRAIN_LOSS)
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        raise ValueError(f"train-loss must be a finite number, got {loss!r}")
    return metrics, checked_examples(metrics, max_examples)


def decoded_factors(record: ArrayRecord, settings: ClientSettings, rules: TrainRules
                    ) -> tuple[Decoded, dict[str, LoraFactors], int]:
    """The reply's adapter, shapes checked before allocation, finite, at one rank."""
    scale = settings.alpha / settings.rank  # a pruned reply keeps it: alpha follows r
    try:
        decoded = decode_adapter(record, ShapeRule(rules.expected, settings.rank, rules.pruning))
        factors = factors_from_state_dict(decoded.values, scale)
    except CodecError as err:
        raise ValueError(f"undecodable adapter: {err}") from None
    if not factors:
        raise ValueError("empty adapter")
    bad = [name for name, f in factors.items() if not f.is_finite()]
    if bad:
        raise ValueError(f"non-finite values in {len(bad)} modules, e.g. {bad[0]}")
    rank = reply_rank(factors, rules.expected, settings.rank, rules.pruning)
    return decoded, factors, rank


@dataclass(frozen=True)
class LatentRule:
    """The tensors a Fed-SB (client mode "latent") reply may declare: one r x r R per
    adapted module, r the assigned rank; checked before anything is allocated."""

    modules: Mapping[str, tuple[int, int]]
    rank: int

    def __call__(self, key: str, shape: tuple[int, ...]) -> None:
        try:
            name = latent_module(key)
        except ValueError as err:
            raise CodecError(str(err)) from None
        if name not in self.modules:
            raise CodecError(f"{name!r} is not an adapted module")
        if tuple(shape) != (self.rank, self.rank):
            raise CodecError(f"{key}: shape {list(shape)}, expected [{self.rank}, {self.rank}]")


def latent_factors(record: ArrayRecord, settings: ClientSettings, rules: TrainRules
                   ) -> tuple[dict[str, LoraFactors], dict[str, LoraFactors]]:
    """A Fed-SB reply (one R per module) as the client's LoRA and the start it trained
    from: A_0 and B_start as the server sent them, B = B_start + B_0 R (B_0 rebuilt from
    the seed tree, as the client drew it)."""
    if keys.is_packed(record):
        raise ValueError("a fedsb reply carries one r x r R per module, not a packed blob")
    rule = LatentRule(rules.expected, settings.rank)
    try:
        values = {latent_module(k): dense_tensor(a, k, rule) for k, a in record.items()}
    except CodecError as err:
        raise ValueError(f"undecodable fedsb reply: {err}") from None
    if set(values) != set(rules.expected):
        missing = sorted(set(rules.expected) - set(values))[:3]
        raise ValueError(f"fedsb reply lacks modules, e.g. {missing}")
    bad = [name for name, R in values.items() if not torch.isfinite(R).all()]
    if bad:
        raise ValueError(f"non-finite values in {len(bad)} modules, e.g. {bad[0]}")
    like = {}
    for name, (inp, out) in rules.expected.items():
        like[name + A_SUFFIX] = torch.empty((settings.rank, inp), device="meta")
        like[name + B_SUFFIX] = torch.empty((out, settings.rank), device="meta")
    start = factors_from_state_dict(client_start_state(settings, like, rules),
                                    settings.alpha / settings.rank)
    factors = {name: expand_latent(start[name], seeded_latent_basis(
        rules.run_seed, name, rules.expected[name][1], settings.rank), R)
        for name, R in values.items()}
    return factors, start


def train_update(content: RecordDict, settings: ClientSettings, rules: TrainRules
                 ) -> ClientUpdate:
    """One train reply as a ClientUpdate, or ValueError with the reason (or whatever a
    decoder ran into: the caller drops the reply either way). A packed reply is an
    update: it is added to the start the server rebuilt. The update's ``rank`` metric
    is the rank it came back with (smaller than assigned after HetLoRA pruning)."""
    metrics, num_examples = train_metrics(content, rules.max_examples, rules.client_dp,
                                         rules.sample_dp)
    record = content.array_records[keys.ADAPTER]
    if rules.client_mode == "latent":
        factors, start = latent_factors(record, settings, rules)
        norm = update_norm(factors, start)
        if rules.max_update_norm > 0 and norm > rules.max_update_norm:
            raise ValueError(f"update norm {norm:.4g} exceeds federation.max_update_norm "
                             f"= {rules.max_update_norm:g}")
        return ClientUpdate(factors=factors, num_examples=num_examples,
                            client_id=str(settings.partition),
                            metrics={**metrics, "rank": settings.rank}, start=start)
    decoded, factors, rank = decoded_factors(record, settings, rules)
    packed = keys.is_packed(record)
    bound = rules.max_update_norm
    start = None
    if packed or rules.keep_start or bound > 0:
        scale = settings.alpha / settings.rank
        start = factors_from_state_dict(client_start_state(settings, decoded.values, rules),
                                        scale)
    if packed:
        assert start is not None
        factors = {n: LoraFactors(A=start[n].A + f.A, B=start[n].B + f.B, scale=f.scale)
                   for n, f in factors.items()}
    if bound > 0:
        assert start is not None
        norm = update_norm(factors, start)
        if norm > bound:
            raise ValueError(f"update norm {norm:.4g} exceeds federation.max_update_norm "
                             f"= {bound:g}")
    return ClientUpdate(factors=factors, num_examples=num_examples,
                        client_id=str(settings.partition), metrics={**metrics, "rank": rank},
                        masks=sent_masks(decoded.masks, factors) if packed else None,
                        start=start)


def sample_epsilon_max(updates: list[ClientUpdate]) -> dict[str, float]:
    """DP-SGD: the largest per-client epsilon reported this round (as a round metric)."""
    values = [float(u.metrics[keys.SAMPLE_EPSILON]) for u in updates
              if keys.SAMPLE_EPSILON in u.metrics]
    return {"sample-epsilon-max": max(values)} if values else {}
