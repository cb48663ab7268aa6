"""Compression of what travels: top-k sparsity with error feedback, fp16 / int8 values.

A compressed payload is ONE byte blob (a uint8 tensor), so the wire carries one array
header and one key instead of one per tensor; at 5 % density those per-array headers
would otherwise cost as much as the data. Layout (little-endian):

    b"FTPK" | version u8 | tensors u32 | names_len u32 | zlib(names joined by "\\n")
    per tensor, in name order:
        ndim u8 | dims u32 x ndim | values u8 | positions u8 | index bytes u8 | k u32 |
        block u32 | position bytes | value bytes | absmax f32 x ceil(k / block) (int8 only)

positions: 0 dense (k = numel), 1 sorted flat indices (uint8/uint16/int32, the smallest
that fits numel), 2 a bitmask of numel bits -- the encoder picks whichever of 1 and 2 is
smaller. values: fp32, fp16, or int8 with one float32 absmax per block (linear,
symmetric: q = round(127 x / absmax)). The int8 codec is plain torch, not bitsandbytes:
both ends must decode bit-identically on any machine (the server rebuilds what a client
started from), and a server need not have bitsandbytes at all.

Everything is plain tensors and bytes (no Flower): the Flower layer wraps the blob.

A blob from someone else (a client's upload, on the server) is decoded with the shapes
the receiver expects (:func:`decode_state`'s ``expected``): every declared shape, count
and length is checked against them and against the blob's own size BEFORE anything is
allocated, so a blob costs its receiver memory in proportion to the honest payload and
to its own length, never to what it declares.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedtune.core.codec import A_SUFFIX, B_SUFFIX, CodecError

MAGIC = b"FTPK"
VERSION = 1
VALUE_CODECS = ("fp32", "fp16", "int8")
SELECTIONS = ("tensor", "product")  # per-tensor top-k, or by effect on B @ A per module
DENSE, INDICES, BITMASK = 0, 1, 2
_HEAD = struct.Struct("<4sBII")
_TENSOR = struct.Struct("<BBBII")  # values, positions, index bytes, k, block
_INDEX_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.int32}
#: the smallest record a tensor can have (1 dimension, no positions, no values): a blob
#: that declares more tensors than its length holds is refused before its names are read
_MIN_RECORD = 1 + 4 + _TENSOR.size
#: the longest tensor name accepted; bounds the decompressed name list (zlib expands up
#: to ~1000x, so the compressed length alone bounds nothing)
MAX_NAME_BYTES = 1024

#: what a receiver expects: name -> shape (exactly these shapes; names outside it are
#: refused), or a rule called with (name, declared shape) that raises CodecError to refuse
Expected = Mapping[str, tuple[int, ...]] | Callable[[str, tuple[int, ...]], None]


@dataclass(frozen=True)
class CompressionSpec:
    """What one direction of traffic does: keep ``density`` of each tensor's entries
    (largest magnitudes), send values as ``values``; int8 uses blocks of ``block_size``."""

    density: float = 1.0
    values: str = "fp32"
    block_size: int = 256

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density = {self.density!r} is not allowed; expected a number "
                             "in (0, 1]")
        if self.values not in VALUE_CODECS:
            raise ValueError(f"values = {self.values!r} is not allowed; expected one of "
                             f"{', '.join(VALUE_CODECS)}")
        if self.block_size < 1:
            raise ValueError(f"block_size = {self.block_size!r} is not allowed; expected an "
                             "integer >= 1")

    @property
    def is_identity(self) -> bool:
        """True when nothing is compressed (dense fp32: the plain per-tensor format)."""
        return self.density == 1.0 and self.values == "fp32"


@dataclass(frozen=True)
class Decoded:
    """A decoded payload: dense tensors (zeros where nothing was sent) and, per tensor,
    a boolean mask of the entries that were sent (None when the tensor was dense)."""

    values: dict[str, Tensor]
    masks: dict[str, Tensor | None]


# ----------------------------------------------------------------------- selection
def topk_positions(tensor: Tensor, density: float) -> Tensor:
    """Sorted flat positions of the ceil(density * numel) largest-magnitude entries.

    Zero entries are never selected (an all-zero tensor sends nothing), so a frozen or
    untouched tensor costs only its header.
    """
    flat = tensor.detach().reshape(-1)
    k = min(math.ceil(density * flat.numel()), int(torch.count_nonzero(flat)))
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    if k == flat.numel():
        return torch.arange(k)
    return torch.topk(flat.abs(), k, sorted=False).indices.sort().values


# ----------------------------------------------------------------------- values
def quantize_int8(values: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Blockwise absmax int8: (codes int8 [k], absmax float32 [ceil(k / block)])."""
    x = values.detach().to(torch.float32).reshape(-1)
    blocks = math.ceil(x.numel() / block)
    padded = torch.zeros(blocks * block)
    padded[: x.numel()] = x
    grouped = padded.view(blocks, block)
    absmax = grouped.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.round(grouped / safe[:, None] * 127.0).clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1)[: x.numel()], absmax


def dequantize_int8(codes: Tensor, absmax: Tensor, block: int) -> Tensor:
    """Inverse of :func:`quantize_int8` (up to absmax / 254 per entry). Each code's scale
    is looked up by index, so memory follows the number of codes, not ``block`` (which a
    received header declares: up to 2**32 - 1)."""
    scale = absmax[torch.arange(codes.numel()) // block] / 127.0
    return codes.to(torch.float32) * scale


def _encode_values(values: Tensor, codec: str, block: int) -> bytes:
    if codec == "fp32":
        return values.to(torch.float32).numpy().tobytes()
    if codec == "fp16":
        return values.to(torch.float16).numpy().tobytes()
    codes, absmax = quantize_int8(values, block)
    return codes.numpy().tobytes() + absmax.numpy().astype("<f4").tobytes()


# ----------------------------------------------------------------------- positions
def _index_bytes(numel: int) -> int:
    return 1 if numel <= 2**8 else 2 if numel <= 2**16 else 4


def _encode_positions(positions: Tensor, numel: int) -> tuple[int, int, bytes]:
    """(position codec, index bytes, data): the smaller of an index list and a bitmask."""
    width = _index_bytes(numel)
    if positions.numel() * width <= math.ceil(numel / 8):
        data = positions.numpy().astype(_INDEX_DTYPES[width]).tobytes()
        return INDICES, width, data
    mask = np.zeros(numel, dtype=bool)
    mask[positions.numpy()] = True
    return BITMASK, 0, np.packbits(mask, bitorder="little").tobytes()


# ----------------------------------------------------------------------- encode
def _tensor_record(shape: tuple[int, ...], spec: CompressionSpec, codec: int, width: int,
                   pos_data: bytes, values: Tensor, k: int | None = None) -> bytes:
    """Header, positions and values of one tensor; ``k`` (default: the number of values)
    is the count the header declares."""
    head = struct.pack(f"<B{len(shape)}I", len(shape), *shape)
    value_code = VALUE_CODECS.index(spec.values)
    declared = values.numel() if k is None else k
    body = _TENSOR.pack(value_code, codec, width, declared, spec.block_size)
    return head + body + pos_data + _encode_values(values, spec.values, spec.block_size)


def encode_tensor(tensor: Tensor, spec: CompressionSpec,
                  positions: Tensor | None = None) -> bytes:
    """One tensor's record: dense at density 1, else its top-k entries (or the sorted
    flat ``positions`` a selection rule chose)."""
    flat = tensor.detach().to(torch.float32).reshape(-1).cpu()
    shape = tuple(tensor.shape)
    if spec.density == 1.0:
        return _tensor_record(shape, spec, DENSE, 0, b"", flat)
    if positions is None:
        positions = topk_positions(flat, spec.density)
    codec, width, pos_data = _encode_positions(positions, flat.numel())
    return _tensor_record(shape, spec, codec, width, pos_data, flat[positions])


def encode_indexed(shape: tuple[int, ...], indices: Tensor, values: Tensor,
                   spec: CompressionSpec) -> bytes:
    """A record with exactly these indices and values, written as they are (no checks:
    the decoder is the one that validates). For tools and tests that build payloads."""
    width = _index_bytes(math.prod(shape))
    data = indices.numpy().astype(_INDEX_DTYPES[width]).tobytes()
    # k is declared from the indices, as a sender would; the values may disagree
    return _tensor_record(shape, spec, INDICES, width, data, values.to(torch.float32),
                          k=indices.numel())


def pack_records(names: list[str], records: list[bytes]) -> Tensor:
    """Named tensor records (already encoded) as one uint8 blob."""
    packed_names = zlib.compress("\n".join(names).encode(), 9)
    parts = [_HEAD.pack(MAGIC, VERSION, len(names), len(packed_names)), packed_names, *records]
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def encode_state(state: Mapping[str, Tensor], spec: CompressionSpec,
                 positions: Mapping[str, Tensor] | None = None) -> Tensor:
    """A whole state dict as one uint8 blob (see the module docstring); ``positions``
    overrides the per-tensor top-k for the tensors it names."""
    names = sorted(state)
    chosen = positions or {}
    return pack_records(names, [encode_tensor(state[n], spec, chosen.get(n)) for n in names])


def product_positions(update: Mapping[str, Tensor], factors: Mapping[str, Tensor],
                      density: float) -> dict[str, Tensor]:
    """Per LoRA module, the entries of (dA, dB) that move ``B @ A`` most, to first order.

    dB_ij shifts the product by |dB_ij| * ||A_j,:|| and dA_jk by ||B_:,j|| * |dA_jk|;
    the module's ceil(density * (|A| + |B|)) highest-scoring entries are sent, wherever
    they are. Per-tensor top-k spends the same bytes on A as on B even when one barely
    matters (a fresh LoRA's A hardly moves in a few steps; FFA's never does).
    ``factors`` are the client's current A and B (peft keys); unpaired keys are left to
    per-tensor top-k.
    """
    out: dict[str, Tensor] = {}
    for a_key in (k for k in update if k.endswith(A_SUFFIX)):
        b_key = a_key[: -len(A_SUFFIX)] + B_SUFFIX
        if b_key not in update:
            continue
        A, B = factors[a_key].to(torch.float32), factors[b_key].to(torch.float32)
        score_a = (update[a_key].abs() * B.norm(dim=0)[:, None]).reshape(-1)
        score_b = (update[b_key].abs() * A.norm(dim=1)[None, :]).reshape(-1)
        scores = torch.cat([score_a, score_b])
        k = min(math.ceil(density * scores.numel()), int(torch.count_nonzero(scores)))
        chosen = torch.topk(scores, k).indices if k else torch.zeros(0, dtype=torch.int64)
        n_a = score_a.numel()
        out[a_key] = chosen[chosen < n_a].sort().values
        out[b_key] = (chosen[chosen >= n_a] - n_a).sort().values
    return out


# ----------------------------------------------------------------------- decode
class _Reader:
    """Bounds-checked reads from a blob; running past the end is a CodecError."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise CodecError(f"payload truncated while reading {what} "
                             f"({n} bytes at offset {self.at} of {len(self.data)})")
        chunk = self.data[self.at: self.at + n]
        self.at += n
        return chunk

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))


def _decode_positions(reader: _Reader, name: str, codec: int, width: int, k: int,
                      numel: int) -> Tensor:
    if codec == INDICES:
        if width not in _INDEX_DTYPES:
            raise CodecError(f"{name}: index width {width} is not 1, 2 or 4 bytes")
        raw = reader.take(k * width, f"{name} indices")
        idx = torch.from_numpy(np.frombuffer(raw, dtype=_INDEX_DTYPES[width]).astype(np.int64))
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise CodecError(f"{name}: index out of range [0, {numel}) "
                             f"(min {int(idx.min())}, max {int(idx.max())})")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise CodecError(f"{name}: indices must be strictly increasing "
                             "(duplicate or unsorted positions)")
        return idx
    if codec == BITMASK:
        raw = reader.take(math.ceil(numel / 8), f"{name} bitmask")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        if bits[numel:].any():
            raise CodecError(f"{name}: bitmask marks positions beyond its {numel} entries")
        idx = torch.from_numpy(np.flatnonzero(bits[:numel]).astype(np.int64))
        if idx.numel() != k:
            raise CodecError(f"{name}: bitmask has {idx.numel()} positions but {k} values")
        return idx
    raise CodecError(f"{name}: unknown position codec {codec}")


def _decode_values(reader: _Reader, name: str, code: int, k: int, block: int) -> Tensor:
    if code >= len(VALUE_CODECS):
        raise CodecError(f"{name}: unknown value codec {code}")
    codec = VALUE_CODECS[code]
    if codec == "fp32":
        raw = reader.take(4 * k, f"{name} values")
        return torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy())
    if codec == "fp16":
        raw = reader.take(2 * k, f"{name} values")
        return torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float32))
    if block < 1:
        raise CodecError(f"{name}: int8 block size must be >= 1, got {block}")
    codes = torch.from_numpy(np.frombuffer(reader.take(k, f"{name} values"), np.int8).copy())
    blocks = math.ceil(k / block)
    absmax = np.frombuffer(reader.take(4 * blocks, f"{name} absmax"), dtype="<f4")
    return dequantize_int8(codes, torch.from_numpy(absmax.copy()), block)


def _exact_shapes(expected: Mapping[str, tuple[int, ...]]
                  ) -> Callable[[str, tuple[int, ...]], None]:
    def check(name: str, shape: tuple[int, ...]) -> None:
        if name not in expected:
            raise CodecError(f"{name}: not a tensor the receiver expects")
        if tuple(shape) != tuple(expected[name]):
            raise CodecError(f"{name}: declared shape {list(shape)}, expected "
                             f"{list(expected[name])}")
    return check


def _decode_tensor(reader: _Reader, name: str,
                   check: Callable[[str, tuple[int, ...]], None] | None
                   ) -> tuple[Tensor, Tensor | None]:
    (ndim,) = reader.unpack(struct.Struct("<B"), f"{name} ndim")
    if not 1 <= ndim <= 4:
        raise CodecError(f"{name}: declared {ndim} dimensions (allowed 1 to 4)")
    shape = struct.unpack(f"<{ndim}I", reader.take(4 * ndim, f"{name} shape"))
    if check is not None:  # before anything of this size exists
        check(name, shape)
    numel = math.prod(shape)
    code, codec, width, k, block = reader.unpack(_TENSOR, f"{name} header")
    if k > numel:
        raise CodecError(f"{name}: {k} values for a tensor of {numel} entries")
    if codec == DENSE:
        if k != numel:
            raise CodecError(f"{name}: dense tensor with {k} values, expected {numel}")
        values = _decode_values(reader, name, code, k, block)
        return values.reshape(shape), None
    positions = _decode_positions(reader, name, codec, width, k, numel)
    values = _decode_values(reader, name, code, k, block)
    dense = torch.zeros(numel)
    dense[positions] = values
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[positions] = True
    return dense.reshape(shape), mask.reshape(shape)


def _names(reader: _Reader, count: int, names_len: int) -> list[str]:
    """The tensor names, decompressed no further than ``count`` names can be long."""
    limit = count * (MAX_NAME_BYTES + 1)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(reader.take(names_len, "tensor names"), limit + 1)
        text = raw.decode()
    except (zlib.error, UnicodeDecodeError) as err:
        raise CodecError(f"tensor names are corrupt: {err}") from None
    if len(raw) > limit or inflater.unconsumed_tail:
        raise CodecError(f"tensor names are longer than {count} names of at most "
                         f"{MAX_NAME_BYTES} bytes")
    if not inflater.eof:
        raise CodecError("tensor names are corrupt: truncated zlib stream")
    return text.split("\n") if count else []


def decode_state(blob: Tensor | bytes, expected: Expected | None = None) -> Decoded:
    """Inverse of :func:`encode_state`; every malformed field is a CodecError naming it.

    With ``expected`` (see :data:`Expected`), every declared shape is checked before the
    tensor is read or allocated: a blob from an untrusted sender must be decoded with it
    (a sparse record's header alone declares a tensor the receiver would otherwise
    allocate in full). Without it the declared shapes are trusted: only for blobs this
    process made or got from its own server. Which expected names are missing is the
    caller's concern (this decodes what was sent).
    """
    data = bytes(blob.numpy().tobytes() if isinstance(blob, Tensor) else blob)
    reader = _Reader(data)
    magic, version, count, names_len = reader.unpack(_HEAD, "payload header")
    if magic != MAGIC or version != VERSION:
        raise CodecError(f"not a fedtune packed payload (magic {magic!r}, version {version})")
    check = _exact_shapes(expected) if isinstance(expected, Mapping) else expected
    if isinstance(expected, Mapping) and count > len(expected):
        raise CodecError(f"header says {count} tensors, more than the {len(expected)} "
                         "expected")
    if count * _MIN_RECORD > len(data) - reader.at:
        raise CodecError(f"header says {count} tensors but the payload has room for at "
                         f"most {(len(data) - reader.at) // _MIN_RECORD}")
    names = _names(reader, count, names_len)
    if len(names) != count or len(set(names)) != count:
        raise CodecError(f"header says {count} tensors but names list {len(names)} "
                         f"({len(set(names))} distinct)")
    values: dict[str, Tensor] = {}
    masks: dict[str, Tensor | None] = {}
    for name in names:
        values[name], masks[name] = _decode_tensor(reader, name, check)
    if reader.at != len(data):
        raise CodecError(f"{len(data) - reader.at} unexpected bytes after the last tensor")
    return Decoded(values, masks)


# ----------------------------------------------------------------------- error feedback
def compress_with_feedback(
    update: Mapping[str, Tensor], residual: Mapping[str, Tensor], spec: CompressionSpec,
    error_feedback: bool = True,
    select: Callable[[dict[str, Tensor]], Mapping[str, Tensor]] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Encode ``update + residual``; return the blob and the new residual.

    The new residual is exactly what the receiver will NOT see (entries left out and
    rounding of those sent), so over rounds sum(sent) + final residual == sum(updates),
    whichever entries ``select`` (corrected update -> positions; default per-tensor
    top-k) picks. A residual whose shape no longer matches (the rank changed) is dropped.
    """
    corrected = {}
    for name, tensor in update.items():
        carried = residual.get(name) if error_feedback else None
        if carried is not None and carried.shape == tensor.shape:
            corrected[name] = tensor.detach().to(torch.float32) + carried
        else:
            corrected[name] = tensor.detach().to(torch.float32)
    positions = select(corrected) if select is not None and spec.density < 1.0 else None
    blob = encode_state(corrected, spec, positions)
    if not error_feedback:
        return blob, {}
    sent = decode_state(blob).values
    return blob, {name: corrected[name] - sent[name] for name in corrected}


def dense_nbytes(state: Mapping[str, Tensor]) -> int:
    """What the same tensors cost as dense fp32 data (the baseline of every ratio)."""
    return sum(4 * t.numel() for t in state.values())
