"""Sparsity-aware merging: the mask-aware mean against a coordinate-by-coordinate
reference, TIES on a hand-computed example, and the aggregators that use them."""

from __future__ import annotations

import itertools

import pytest
import torch
from lora_reference import IN, OUT, dense, exact_average, rel

from fedtune.aggregation import get_aggregator
from fedtune.aggregation.base import AggregationError
from fedtune.aggregation.sparse import masked_mean, merge_tensors, ties_merge, trim_to_density
from fedtune.core.adapters import ClientUpdate, LoraFactors, LoraMask


def _reference_masked_mean(values, weights, masks):
    """Loop over every coordinate: average over the clients that sent it."""
    out = torch.empty_like(values[0], dtype=torch.float64)
    for idx in itertools.product(*(range(n) for n in values[0].shape)):
        senders = [k for k, m in enumerate(masks) if m is None or bool(m[idx])]
        if senders:
            total = sum(weights[k] for k in senders)
            out[idx] = sum(weights[k] * float(values[k][idx]) for k in senders) / total
        else:
            out[idx] = sum(w * float(v[idx]) for w, v in zip(weights, values, strict=True))
    return out


def _random(gen, shape, k):
    values = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(k)]
    masks = [torch.rand(shape, generator=gen) < 0.3 for _ in range(k)]
    return values, masks


def test_masked_mean_equals_the_coordinate_reference(gen):
    values, masks = _random(gen, (6, 7), 4)
    masks[2] = None  # one dense client among sparse ones
    weights = [0.1, 0.2, 0.3, 0.4]
    assert torch.allclose(masked_mean(values, weights, masks),
                          _reference_masked_mean(values, weights, masks), atol=1e-12)


def test_an_entry_one_client_sent_is_not_divided_by_everyones_weight():
    values = [torch.tensor([[4.0, 1.0]]), torch.tensor([[0.0, 3.0]])]
    masks = [torch.tensor([[True, True]]), torch.tensor([[False, True]])]
    out = masked_mean(values, [0.25, 0.75], masks)
    assert out.tolist() == [[4.0, 0.25 * 1.0 + 0.75 * 3.0]]


def test_full_masks_give_the_plain_weighted_average(gen):
    values, _ = _random(gen, (5, 3), 3)
    weights = [0.5, 0.3, 0.2]
    plain = sum(w * v for w, v in zip(weights, values, strict=True))
    full = [torch.ones(5, 3, dtype=torch.bool)] * 3
    assert torch.allclose(masked_mean(values, weights, full), plain, atol=1e-12)
    assert torch.allclose(masked_mean(values, weights, [None] * 3), plain, atol=1e-12)


def test_ties_on_a_hand_built_example():
    # three clients, equal weights, start 0; density 0.5 keeps the 2 largest of 4 entries
    deltas = [torch.tensor([3.0, -1.0, 0.5, 2.0]),   # keeps 3, 2
              torch.tensor([-2.0, 4.0, 0.1, -0.2]),  # keeps -2, 4
              torch.tensor([1.0, -3.0, 0.0, 5.0])]   # keeps -3, 5
    start = torch.zeros(4)
    w = [1 / 3] * 3
    out = ties_merge(deltas, w, [None] * 3, [start] * 3, density=0.5)
    # entry 0: kept 3, -2, 0 -> mass +1 -> sign + -> only 3 agrees -> 3
    # entry 1: kept 0, 4, -3 -> mass +1 -> sign + -> only 4 agrees -> 4
    # entry 2: nothing kept -> 0
    # entry 3: kept 2, 0, 5 -> sign + -> mean of 2 and 5 -> 3.5
    assert torch.allclose(out, torch.tensor([3.0, 4.0, 0.0, 3.5]))
    # the start is added back, weighted
    moved = ties_merge([d + 1 for d in deltas], w, [None] * 3, [torch.ones(4)] * 3, 0.5)
    assert torch.allclose(moved, out + 1)


def test_ties_with_unequal_weights_and_masks():
    deltas = [torch.tensor([1.0, -4.0]), torch.tensor([-3.0, 2.0])]
    masks = [torch.tensor([True, False]), None]  # client 0 never sent entry 1
    out = ties_merge(deltas, [0.75, 0.25], masks, [torch.zeros(2)] * 2, density=1.0)
    # entry 0: mass 0.75 - 0.75 = 0 -> sign 0 -> no client agrees -> 0
    # entry 1: client 0's -4 was not sent -> only 2 -> 2
    assert out.tolist() == [0.0, 2.0]
    assert trim_to_density(torch.tensor([1.0, -5.0, 2.0]), 0.5).tolist() == [0.0, -5.0, 2.0]


def test_ties_needs_the_clients_starting_points():
    with pytest.raises(AggregationError, match="starting point"):
        merge_tensors([torch.ones(2)], [1.0], [None], None, method="ties")


# ----------------------------------------------------------------- in the aggregators
def _sparse_updates(gen, ranks, examples, density=0.3, scale=1.0, shared_A=None):
    """Clients that each sent a random subset of entries; unsent entries hold a shared
    start (as the server rebuilds them), like a real sparse round."""
    updates = []
    for rank, n in zip(ranks, examples, strict=True):
        start = {m: LoraFactors(A=torch.randn(rank, IN, generator=gen, dtype=torch.float64)
                                if shared_A is None else shared_A[:rank].clone(),
                                B=torch.zeros(OUT, rank, dtype=torch.float64), scale=scale)
                 for m in ("q", "v")}
        factors, masks = {}, {}
        for m, s in start.items():
            mA = torch.rand(rank, IN, generator=gen) < density
            mB = torch.rand(OUT, rank, generator=gen) < density
            if shared_A is not None:
                mA = torch.zeros_like(mA)  # ffa: A never moves, nothing of it is sent
            A = torch.where(mA, torch.randn(rank, IN, generator=gen, dtype=torch.float64), s.A)
            B = torch.where(mB, torch.randn(OUT, rank, generator=gen, dtype=torch.float64), s.B)
            factors[m] = LoraFactors(A=A, B=B, scale=scale)
            masks[m] = LoraMask(A=mA, B=mB)
        updates.append(ClientUpdate(factors=factors, num_examples=n, masks=masks, start=start))
    return updates


def _weights(updates):
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def test_fedavg_with_masks_matches_the_coordinate_reference(gen):
    updates = _sparse_updates(gen, [4, 4, 4], [10, 30, 60])
    merged = get_aggregator("fedavg").aggregate(updates, None)
    w = _weights(updates)
    for m in ("q", "v"):
        for part in ("A", "B"):
            ref = _reference_masked_mean([getattr(u.factors[m], part) for u in updates], w,
                                         [getattr(u.masks[m], part) for u in updates])
            assert torch.allclose(getattr(merged.factors[m], part), ref, atol=1e-12)


def test_zeropad_skip_padding_averages_each_component_over_the_clients_that_have_it(gen):
    updates = _sparse_updates(gen, [2, 4], [50, 50])
    merged = get_aggregator("zeropad", padding="skip").aggregate(updates, None)
    A0, A1 = updates[0].factors["q"].A, updates[1].factors["q"].A
    m0, m1 = updates[0].masks["q"].A, updates[1].masks["q"].A
    out = merged.factors["q"].A
    # rows 2..3 exist only at client 1: what it sent is taken whole; what nobody sent
    # falls back to the dense zero-padding average (half of client 1's start value)
    assert torch.equal(out[2:][m1[2:]], A1[2:][m1[2:]])
    assert torch.allclose(out[2:][~m1[2:]], 0.5 * A1[2:][~m1[2:]])
    padded = torch.cat([A0, torch.zeros(2, IN, dtype=torch.float64)])
    ref = _reference_masked_mean([padded, A1], [0.5, 0.5],
                                 [torch.cat([m0, torch.zeros(2, IN, dtype=torch.bool)]), m1])
    assert torch.allclose(out, ref, atol=1e-12)


def test_zeropad_zeros_padding_counts_where_a_client_with_the_component_sent(gen):
    updates = _sparse_updates(gen, [2, 4], [25, 75])
    merged = get_aggregator("zeropad").aggregate(updates, None)
    A1, m1 = updates[1].factors["q"].A, updates[1].masks["q"].A
    tail = merged.factors["q"].A[2:]
    # client 1 sent it: client 0's padding is a zero with weight 1/4 -> 3/4 of the value
    assert torch.allclose(tail[m1[2:]], 0.75 * A1[2:][m1[2:]])
    # nobody sent it: the plain zero-padding average of the start values
    assert torch.allclose(tail[~m1[2:]], 0.75 * A1[2:][~m1[2:]])


def test_zeropad_skip_with_dense_clients(updates_factory):
    updates = updates_factory([2, 4, 4], [10, 20, 30])
    merged = get_aggregator("zeropad", padding="skip").aggregate(updates, None)
    for m in ("q", "v"):
        A = [u.factors[m].A for u in updates]
        head = (10 * A[0] + 20 * A[1][:2] + 30 * A[2][:2]) / 60
        tail = (20 * A[1][2:] + 30 * A[2][2:]) / 50
        assert torch.allclose(merged.factors[m].A, torch.cat([head, tail]), atol=1e-6)
        B = [u.factors[m].B for u in updates]
        tail_b = (20 * B[1][:, 2:] + 30 * B[2][:, 2:]) / 50
        assert torch.allclose(merged.factors[m].B[:, 2:], tail_b, atol=1e-6)
    with pytest.raises(ValueError, match="padding = 'ones' is not allowed"):
        get_aggregator("zeropad", padding="ones")


def test_dense_masks_leave_every_additive_aggregator_unchanged(updates_factory):
    updates = updates_factory([4, 4, 4], [10, 20, 30])
    full = [ClientUpdate(u.factors, u.num_examples,
                         masks={m: LoraMask.full(f) for m, f in u.factors.items()})
            for u in updates]
    for name in ("fedavg", "zeropad", "hetlora"):
        plain = get_aggregator(name).aggregate(updates, None)
        masked = get_aggregator(name).aggregate(full, None)
        for m in plain.factors:
            assert torch.allclose(plain.factors[m].A, masked.factors[m].A, atol=1e-6)
            assert torch.allclose(plain.factors[m].B, masked.factors[m].B, atol=1e-6)


def test_ffa_merges_sparse_B_over_senders_and_keeps_the_shared_A(gen):
    shared = torch.randn(4, IN, generator=gen, dtype=torch.float64)
    updates = _sparse_updates(gen, [4, 4, 4], [1, 1, 2], shared_A=shared)
    merged = get_aggregator("ffa").aggregate(updates, None)
    w = _weights(updates)
    ref = _reference_masked_mean([u.factors["v"].B for u in updates], w,
                                 [u.masks["v"].B for u in updates])
    assert torch.allclose(merged.factors["v"].B, ref, atol=1e-12)
    assert torch.equal(merged.factors["v"].A, shared)


def test_fedavg_ties_merges_updates_from_the_start(gen):
    updates = _sparse_updates(gen, [3, 3], [1, 1], density=1.0)
    merged = get_aggregator("fedavg", merge="ties", ties_density=1.0).aggregate(updates, None)
    start_mean = 0.5 * (updates[0].start["q"].A + updates[1].start["q"].A)
    d = [u.factors["q"].A - u.start["q"].A for u in updates]
    agree = torch.sign(d[0]) == torch.sign(d[1])
    expected = start_mean + torch.where(agree, 0.5 * (d[0] + d[1]),
                                        torch.where(d[0].abs() > d[1].abs(), d[0], d[1]))
    assert torch.allclose(merged.factors["q"].A, expected, atol=1e-12)


def test_flora_stacks_sparse_reconstructed_factors_exactly(gen):
    updates = _sparse_updates(gen, [2, 4, 3], [5, 3, 2], scale=2.0)
    merged = get_aggregator("flora", rank_budget=64).aggregate(updates, None)
    for m in ("q", "v"):
        assert rel(dense(merged.factors[m]), exact_average(updates, m)) < 1e-6


def test_merge_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="merge = 'median' is not allowed"):
        get_aggregator("fedavg", merge="median")
    with pytest.raises(ValueError, match="ties_density"):
        get_aggregator("zeropad", merge="ties", ties_density=0.0)
    with pytest.raises(ValueError, match="bad options"):
        get_aggregator("flora", merge="ties")
