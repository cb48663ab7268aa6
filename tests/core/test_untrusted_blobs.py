"""A packed blob from someone else costs its receiver memory in proportion to what the
receiver expects and to the blob's own length, never to what the blob declares: shapes
are checked before anything is allocated. The cases run one after the other in a fresh
process whose peak resident memory is measured around each (torch's allocations are
invisible to tracemalloc; a case that regresses raises the peak in its own measurement,
and a later case is measured from there), under an address-space limit so that a
regression fails instead of swapping the machine."""

import json
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from fedtune.core.codec import CodecError
from fedtune.core.compress import (
    MAX_NAME_BYTES,
    CompressionSpec,
    decode_state,
    dequantize_int8,
    encode_indexed,
    encode_state,
    pack_records,
    quantize_int8,
)

NAME = "m.q.lora_A.weight"
EXPECTED = {NAME: (8, 576)}

# For each blob named in argv[1:]: builds it with the real encoder (or, for what the
# encoder will not write, the documented layout), decodes it with the expected shapes and
# prints how much the peak RSS grew while decoding (one JSON line per blob).
_PROBE = r"""
import json, resource, struct, sys
import torch
from fedtune.core.codec import CodecError
from fedtune.core.compress import CompressionSpec, decode_state, encode_indexed, pack_records

name, expected = "m.q.lora_A.weight", {"m.q.lora_A.weight": (8, 576)}
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
for kind in sys.argv[1:]:
    if kind == "int8-block":  # one int8 value whose block declares 2**32 - 1 entries
        record = (struct.pack("<B2I", 2, 8, 576) + struct.pack("<BBBII", 2, 1, 2, 1, 2**32 - 1)
                  + struct.pack("<H", 5) + struct.pack("<b", 100) + struct.pack("<f", 1.0))
    else:  # a sparse record of this shape with no values at all
        shape = tuple(int(d) for d in kind.split("x"))
        record = encode_indexed(shape, torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                                CompressionSpec(density=0.5))
    blob = pack_records([name], [record])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        decoded = decode_state(blob, expected)
        outcome = "decoded " + str(tuple(decoded.values[name].shape))
    except CodecError as err:
        outcome = "refused: " + str(err)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"kind": kind, "bytes": blob.numel(), "grew_mb": grew,
                      "outcome": outcome}))
"""
KINDS = ["40000x40000", f"{2**20}x{2**20}", "int8-block"]  # 1.6e9 and 2**40 entries


@pytest.fixture(scope="module")
def probed():
    done = subprocess.run([sys.executable, "-c", _PROBE, *KINDS], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.strip().splitlines()[-len(KINDS):]]
    return {r["kind"]: r for r in results}


@pytest.mark.parametrize("kind", KINDS[:2])
def test_a_tiny_blob_declaring_a_huge_tensor_is_refused_without_allocating_it(kind, probed):
    result = probed[kind]
    assert result["bytes"] < 100  # what the sender spent
    assert result["outcome"].startswith("refused: ")
    assert f"declared shape {[int(d) for d in kind.split('x')]}, expected [8, 576]" in (
        result["outcome"])
    assert result["grew_mb"] < 200, result


def test_an_int8_block_declaring_four_billion_entries_costs_nothing(probed):
    """The shape is the expected one; the header's block size is not a size to allocate."""
    result = probed["int8-block"]
    assert result["outcome"] == "decoded (8, 576)"
    assert result["grew_mb"] < 200, result


def test_int8_lookup_by_index_decodes_exactly_as_before():
    """The scale of each code is absmax[i // block]: bit-identical to repeating each
    absmax block times (what the server rebuilds must equal what the client sent)."""
    gen = torch.Generator().manual_seed(0)
    for n, block in [(1000, 256), (7, 256), (512, 1), (300, 64)]:
        codes, absmax = quantize_int8(torch.randn(n, generator=gen), block)
        old = codes.to(torch.float32) * (absmax.repeat_interleave(block)[:n] / 127.0)
        assert torch.equal(dequantize_int8(codes, absmax, block), old)


def test_declared_shapes_are_held_to_the_expected_ones():
    state = {NAME: torch.randn(8, 576)}
    for spec in (CompressionSpec(), CompressionSpec(density=0.1, values="int8")):
        assert torch.equal(decode_state(encode_state(state, spec), EXPECTED).values[NAME].ne(0),
                           decode_state(encode_state(state, spec)).values[NAME].ne(0))
    wider = encode_state({NAME: torch.randn(8, 577)}, CompressionSpec(density=0.1))
    with pytest.raises(CodecError, match=r"declared shape \[8, 577\], expected \[8, 576\]"):
        decode_state(wider, EXPECTED)
    other = encode_state({"m.k.lora_A.weight": torch.randn(8, 576)}, CompressionSpec())
    with pytest.raises(CodecError, match="not a tensor the receiver expects"):
        decode_state(other, EXPECTED)
    two = encode_state({NAME: torch.randn(8, 576), "m.k.lora_A.weight": torch.randn(2)},
                       CompressionSpec())
    with pytest.raises(CodecError, match="2 tensors, more than the 1 expected"):
        decode_state(two, EXPECTED)


def test_a_rule_sees_every_declared_shape_before_the_tensor_is_read():
    seen = []

    def rule(name, shape):
        seen.append((name, shape))
        if shape[0] > 8:
            raise CodecError(f"{name}: too big")

    blob = encode_state({"a": torch.randn(8, 3), "b": torch.randn(9, 3)}, CompressionSpec())
    with pytest.raises(CodecError, match="b: too big"):
        decode_state(blob, rule)
    assert seen == [("a", (8, 3)), ("b", (9, 3))]


def test_names_that_decompress_past_any_real_name_list_are_refused():
    """zlib inflates ~1000x: 20 KB of compressed newlines would be 20 MB of names."""
    bomb = zlib.compress(b"\n" * (20 << 20), 9)
    assert len(bomb) < 30_000
    blob = struct.pack("<4sBII", b"FTPK", 1, 1, len(bomb)) + bomb + b"\0" * 19
    with pytest.raises(CodecError, match=f"longer than 1 names of at most {MAX_NAME_BYTES}"):
        decode_state(blob)


def test_more_tensors_than_the_blob_has_room_for_are_refused_before_the_names():
    names = zlib.compress(b"a", 9)
    blob = struct.pack("<4sBII", b"FTPK", 1, 2**32 - 1, len(names)) + names
    with pytest.raises(CodecError, match="has room for at most 0"):
        decode_state(blob)


def test_a_real_blob_still_round_trips_through_pack_records():
    record = encode_indexed((8, 576), torch.tensor([1, 9]), torch.tensor([0.5, -2.0]),
                            CompressionSpec(density=0.5))
    decoded = decode_state(pack_records([NAME], [record]), EXPECTED)
    assert decoded.values[NAME].reshape(-1)[[1, 9]].tolist() == [0.5, -2.0]
    assert int(decoded.masks[NAME].sum()) == 2
