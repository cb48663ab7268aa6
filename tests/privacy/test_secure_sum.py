"""The arithmetic of secure aggregation alone: quantisation over a range from the clip
norm (refusing, never clipping, what lies outside), ChaCha20 masks that cancel mod 2^32."""

import numpy as np
import pytest

from fedtune.privacy.secure_sum import (
    NOISE_TAIL,
    Quantizer,
    RangeError,
    add_signed,
    mask_vector,
    modular_sum,
    pair_mask,
    prg_words,
    quantization_range,
    self_mask,
    tail_probability,
)


def test_range_is_the_clip_norm_widened_by_the_noise_tail():
    assert quantization_range(0.5) == 0.5
    assert quantization_range(0.5, 0.1) == pytest.approx(0.5 + NOISE_TAIL * 0.1)
    assert tail_probability() < 1e-14


def test_sum_of_quantised_vectors_is_the_float_sum_within_the_bound():
    rng = np.random.default_rng(0)
    q = Quantizer(1.0, 16)
    vectors = [rng.uniform(-1, 1, 5000) for _ in range(7)]
    total = modular_sum([q.quantize(v) for v in vectors])
    error = np.abs(q.dequantize_sum(total, 7) - np.sum(vectors, axis=0))
    assert error.max() <= q.sum_error_bound(7)
    assert error.max() > q.sum_error_bound(7) / 100  # the bound is not vacuous
    # stochastic rounding is unbiased: the mean error over many coordinates is ~0
    assert abs(np.mean(q.dequantize_sum(total, 7) - np.sum(vectors, axis=0))) < q.step / 10


def test_values_outside_the_range_are_refused_and_counted_not_clipped():
    q = Quantizer(1.0, 16)
    with pytest.raises(RangeError, match="2 of 4 values lie outside"):
        q.quantize(np.array([0.5, 1.5, -2.0, 1.0]))
    with pytest.raises(RangeError, match="1 of 2"):
        q.quantize(np.array([np.nan, 0.0]))


def test_capacity_of_a_sum_mod_2_32():
    q = Quantizer(1.0, 22)
    q.check_capacity(q.max_clients())
    assert q.max_clients() * q.levels < 2**32
    with pytest.raises(ValueError, match="overflows"):
        q.check_capacity(q.max_clients() + 1)


def test_prg_is_deterministic_per_key_and_differs_between_keys():
    a, b = prg_words(bytes(32), 1000), prg_words(bytes(31) + b"\1", 1000)
    assert np.array_equal(a, prg_words(bytes(32), 1000))
    assert np.mean(a == b) < 0.01
    # uniform over 32-bit words: mean near 2^31, every byte value present
    assert abs(a.astype(np.float64).mean() / 2**31 - 1) < 0.1
    assert len(np.unique(a.view(np.uint8))) == 256
    # self and pairwise masks from one secret are different streams
    assert not np.array_equal(self_mask(bytes(32), 10), pair_mask(bytes(32), 10))


def test_pairwise_masks_cancel_and_self_masks_are_removed():
    rng = np.random.default_rng(1)
    q = Quantizer(1.0, 20)
    nodes = [11, 5, 42]
    seeds = {n: rng.bytes(32) for n in nodes}
    pair = {frozenset(p): rng.bytes(32) for p in [(11, 5), (11, 42), (5, 42)]}
    plain = {n: q.quantize(rng.uniform(-1, 1, 300)) for n in nodes}
    masked = {n: mask_vector(plain[n], seeds[n], n,
                             {o: pair[frozenset((n, o))] for o in nodes if o != n})
              for n in nodes}
    total = modular_sum(list(masked.values()))
    for n in nodes:
        total = add_signed(total, self_mask(seeds[n], total.size), -1)
    assert np.array_equal(total, modular_sum(list(plain.values())))
    # one masked vector alone tells nothing: it is not its quantised values
    assert np.mean(masked[5] == plain[5]) < 0.01
