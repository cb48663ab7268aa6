"""Compression codec: exact positions and values, real byte sizes, error feedback, and
malformed payloads rejected with a reason."""

import math
import struct

import pytest
import torch

from fedtune.core.codec import CodecError
from fedtune.core.compress import (
    CompressionSpec,
    compress_with_feedback,
    decode_state,
    dense_nbytes,
    dequantize_int8,
    encode_indexed,
    encode_state,
    pack_records,
    quantize_int8,
    topk_positions,
)

SHAPES = {"m.q.lora_A.weight": (8, 576), "m.q.lora_B.weight": (576, 8),
          "m.v.lora_A.weight": (8, 576), "m.v.lora_B.weight": (192, 8)}


def _state(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


@pytest.mark.parametrize("density", [1.0, 0.5, 0.25, 0.1, 0.05, 0.01])
def test_fp32_keeps_exactly_the_largest_entries_at_their_positions(density):
    state = _state()
    decoded = decode_state(encode_state(state, CompressionSpec(density=density)))
    for key, tensor in state.items():
        k = math.ceil(density * tensor.numel())
        if density == 1.0:
            assert decoded.masks[key] is None
            assert torch.equal(decoded.values[key], tensor)
            continue
        expected = torch.zeros(tensor.numel(), dtype=torch.bool)
        expected[tensor.abs().reshape(-1).argsort(descending=True)[:k]] = True
        mask = decoded.masks[key]
        assert torch.equal(mask.reshape(-1), expected)  # the top-k positions, no others
        assert torch.equal(decoded.values[key][mask], tensor[mask])  # their exact values
        assert not decoded.values[key][~mask].any()  # zeros elsewhere


def test_serialised_size_falls_with_density_as_the_format_predicts():
    state = _state()
    sizes = {}
    for density in (1.0, 0.5, 0.25, 0.1, 0.05):
        for values, width in (("fp32", 4), ("fp16", 2), ("int8", 1)):
            spec = CompressionSpec(density=density, values=values)
            nbytes = encode_state(state, spec).numel()
            sizes[density, values] = nbytes
            payload = 0
            for shape in SHAPES.values():
                n = math.prod(shape)
                k = math.ceil(density * n)
                positions = 0 if density == 1.0 else min(2 * k, math.ceil(n / 8))
                absmax = 4 * math.ceil(k / 256) if values == "int8" else 0
                payload += positions + width * k + absmax
            assert payload < nbytes < payload + 200 + 20 * len(SHAPES)  # header and names
    dense = dense_nbytes(state)
    assert sizes[1.0, "fp32"] >= dense
    for values in ("fp32", "fp16", "int8"):
        ordered = [sizes[d, values] for d in (1.0, 0.5, 0.25, 0.1, 0.05)]
        assert ordered == sorted(ordered, reverse=True)
    assert dense / sizes[0.1, "int8"] > 10  # the target, on SmolLM2 module shapes
    assert dense / sizes[1.0, "int8"] > 3.8


@pytest.mark.parametrize("block", [1, 7, 64, 256])
def test_int8_blockwise_error_is_at_most_half_a_step_of_its_block(block):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3
    x[100:200] = 0.0  # an all-zero stretch must decode to zeros, not NaN
    codes, absmax = quantize_int8(x, block)
    assert codes.dtype == torch.int8 and absmax.numel() == math.ceil(1000 / block)
    back = dequantize_int8(codes, absmax, block)
    step = absmax.repeat_interleave(block)[:1000] / 127
    assert bool(((back - x).abs() <= step / 2 + 1e-6).all())
    assert not back[100:200].any()


def test_fp16_and_int8_payloads_decode_close_to_the_original():
    state = _state()
    for values, tol in (("fp16", 1e-3), ("int8", 1.0 / 127)):
        decoded = decode_state(encode_state(state, CompressionSpec(values=values)))
        for key, tensor in state.items():
            rel = (decoded.values[key] - tensor).abs().max() / tensor.abs().max()
            assert rel <= tol


def test_all_zero_tensors_send_no_entries():
    state = {"a.lora_A.weight": torch.zeros(4, 64), "a.lora_B.weight": torch.zeros(64, 4)}
    blob = encode_state(state, CompressionSpec(density=0.1))
    decoded = decode_state(blob)
    assert all(int(m.sum()) == 0 for m in decoded.masks.values())
    assert blob.numel() < 100
    assert topk_positions(torch.tensor([0.0, 3.0, 0.0, -5.0]), 1.0).tolist() == [1, 3]


def test_error_feedback_sent_plus_residual_equals_the_sum_of_updates():
    spec = CompressionSpec(density=0.05, values="int8", block_size=64)
    residual: dict = {}
    sent_total = {k: torch.zeros(s) for k, s in SHAPES.items()}
    true_total = {k: torch.zeros(s) for k, s in SHAPES.items()}
    for round_ in range(6):
        update = _state(seed=10 + round_)
        blob, residual = compress_with_feedback(update, residual, spec)
        sent = decode_state(blob).values
        for key in SHAPES:
            sent_total[key] += sent[key]
            true_total[key] += update[key]
    for key in SHAPES:
        assert torch.allclose(sent_total[key] + residual[key], true_total[key], atol=1e-4)
        assert residual[key].abs().max() > 0  # something really was held back


def test_error_feedback_off_keeps_no_residual_and_a_changed_shape_resets_it():
    spec = CompressionSpec(density=0.1)
    _, none = compress_with_feedback(_state(), {}, spec, error_feedback=False)
    assert none == {}
    _, residual = compress_with_feedback(_state(), {}, spec)
    smaller = {k: v[:4] if "lora_A" in k else v[:, :4] for k, v in _state(1).items()}
    blob, after = compress_with_feedback(smaller, residual, spec)  # rank shrank: drop it
    expected = encode_state(smaller, spec)
    assert torch.equal(blob, expected)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in smaller.items()}


def test_compression_spec_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match=r"density = 0"):
        CompressionSpec(density=0.0)
    with pytest.raises(ValueError, match=r"density = 1.5"):
        CompressionSpec(density=1.5)
    with pytest.raises(ValueError, match=r"values = 'int4'.*fp32, fp16, int8"):
        CompressionSpec(values="int4")
    with pytest.raises(ValueError, match="block_size"):
        CompressionSpec(block_size=0)
    assert CompressionSpec().is_identity and not CompressionSpec(values="fp16").is_identity


# ---------------------------------------------------------------- malformed payloads
def _one(record: bytes, name="x.lora_A.weight") -> bytes:
    return pack_records([name], [record]).numpy().tobytes()


SPEC = CompressionSpec(density=0.5)


def test_a_hand_built_valid_record_decodes():
    record = encode_indexed((4, 8), torch.tensor([1, 5, 30]), torch.tensor([1.0, -2.0, 3.0]),
                            SPEC)
    decoded = decode_state(_one(record))
    values = decoded.values["x.lora_A.weight"].reshape(-1)
    assert values[[1, 5, 30]].tolist() == [1.0, -2.0, 3.0] and int(values.ne(0).sum()) == 3


@pytest.mark.parametrize("indices, values, reason", [
    ([1, 5, 32], [1.0, 2.0, 3.0], "out of range"),
    ([1, 5, 5], [1.0, 2.0, 3.0], "strictly increasing"),
    ([5, 1, 7], [1.0, 2.0, 3.0], "strictly increasing"),
    ([1, 5, 7], [1.0, 2.0], "truncated"),
    ([1, 5], [1.0, 2.0, 3.0], "unexpected bytes"),
])
def test_bad_indices_and_mismatched_lengths_are_rejected(indices, values, reason):
    record = encode_indexed((4, 8), torch.tensor(indices), torch.tensor(values), SPEC)
    with pytest.raises(CodecError, match=reason):
        decode_state(_one(record))


def test_more_values_than_entries_and_bad_headers_are_rejected():
    record = encode_indexed((2, 2), torch.arange(4), torch.ones(4), SPEC)
    k_at = 1 + 4 * 2 + 3
    too_many = record[:k_at] + struct.pack("<I", 5) + record[k_at + 4:]
    with pytest.raises(CodecError, match="5 values for a tensor of 4 entries"):
        decode_state(_one(too_many))
    with pytest.raises(CodecError, match="not a fedtune packed payload"):
        decode_state(b"JUNK" + bytes(20))
    good = encode_state(_state(), CompressionSpec(density=0.1)).numpy().tobytes()
    with pytest.raises(CodecError, match="truncated"):
        decode_state(good[:-3])
    with pytest.raises(CodecError, match="unexpected bytes"):
        decode_state(good + b"\0")


# ---------------------------------------------------------------- product-aware selection
def _brute_force_scores(update, factors, a_key, b_key):
    """Score of every entry, written out entry by entry: first-order effect on B @ A."""
    A, B = factors[a_key], factors[b_key]
    r, n_in = A.shape
    n_out = B.shape[0]
    scores = []
    for j in range(r):
        col = math.sqrt(sum(float(B[i, j]) ** 2 for i in range(n_out)))
        scores += [abs(float(update[a_key][j, c])) * col for c in range(n_in)]
    for i in range(n_out):
        for j in range(r):
            row = math.sqrt(sum(float(A[j, c]) ** 2 for c in range(n_in)))
            scores.append(abs(float(update[b_key][i, j])) * row)
    return torch.tensor(scores)


def test_product_selection_takes_the_top_entries_of_the_module_by_effect():
    from fedtune.core.compress import product_positions

    gen = torch.Generator().manual_seed(5)
    shapes = {"m.lora_A.weight": (3, 10), "m.lora_B.weight": (7, 3)}
    update = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    factors = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    factors["m.lora_A.weight"][1] *= 10  # component 1 of A is strong: its B column matters
    chosen = product_positions(update, factors, density=0.3)
    k = math.ceil(0.3 * (30 + 21))
    assert chosen["m.lora_A.weight"].numel() + chosen["m.lora_B.weight"].numel() == k
    scores = _brute_force_scores(update, factors, "m.lora_A.weight", "m.lora_B.weight")
    expected = set(scores.argsort(descending=True)[:k].tolist())
    got = set(chosen["m.lora_A.weight"].tolist()) | {30 + i for i in
                                                     chosen["m.lora_B.weight"].tolist()}
    assert got == expected
    b_cols = [i % 3 for i in chosen["m.lora_B.weight"].tolist()]
    assert b_cols.count(1) > b_cols.count(0) + b_cols.count(2)


def test_product_selection_spends_nothing_on_a_frozen_A_and_keeps_the_invariant():
    from fedtune.core.compress import product_positions

    state = _state()
    update = {k: (torch.zeros_like(v) if "lora_A" in k else v) for k, v in state.items()}
    spec = CompressionSpec(density=0.1, values="fp16")
    residual: dict = {}
    total_sent = {k: torch.zeros_like(v) for k, v in update.items()}
    for _ in range(3):
        blob, residual = compress_with_feedback(
            update, residual, spec,
            select=lambda corrected: product_positions(corrected, state, spec.density))
        decoded = decode_state(blob)
        for k in update:
            total_sent[k] += decoded.values[k]
        assert all(int(decoded.masks[k].sum()) == 0 for k in update if "lora_A" in k)
        per_module = math.ceil(0.1 * (8 * 576 + 576 * 8))
        assert int(decoded.masks["m.q.lora_B.weight"].sum()) == min(per_module, 576 * 8)
    for k in update:
        assert torch.allclose(total_sent[k] + residual[k], 3 * update[k], atol=1e-4)
