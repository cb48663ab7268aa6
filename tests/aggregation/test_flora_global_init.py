"""FLoRA with clients starting from the global adapter's top components (flora_init="global"):
the server subtracts what each client started from, so the update stays exact."""

import torch
from lora_reference import dense, exact_average, make_update, rel

from fedtune.aggregation import get_aggregator
from fedtune.aggregation.flora import split_top
from fedtune.aggregation.start import start_from_global
from fedtune.core.codec import factors_from_state_dict, state_dict_from_factors


def test_split_top_parts_add_up_and_clip_at_the_available_rank(gen):
    f = make_update(gen, 6, 1, modules=("q",)).factors["q"]
    top, rest = split_top(f, 4)
    assert (top.rank, rest.rank) == (4, 2)
    assert rel(dense(top) + dense(rest), dense(f)) < 1e-12
    top, rest = split_top(f, 9)
    assert (top.rank, rest.rank) == (6, 0)


def test_global_init_update_is_exact(gen, updates_factory):
    flora = get_aggregator("flora", rank_budget=64, flora_init="global")
    first = updates_factory([2, 4], [10, 30], scales=[2.0, 0.5])
    previous = flora.aggregate(first, None)  # no previous: plain stacking
    assert rel(dense(previous.factors["q"]), exact_average(first, "q")) < 1e-5
    second = updates_factory([2, 8, 4], [5, 10, 25], scales=[1.0, 2.0, 0.25])
    total = sum(u.num_examples for u in second)
    new = flora.aggregate(second, previous)
    for module in ("q", "v"):
        start = sum(u.num_examples / total * dense(split_top(previous.factors[module],
                                                             u.factors[module].rank)[0])
                    for u in second)
        expected = dense(previous.factors[module]) + exact_average(second, module) - start
        assert rel(dense(new.factors[module]), expected) < 1e-5


def test_fresh_init_differs_from_global_init(gen, updates_factory):
    first = updates_factory([4, 4], [1, 1])
    second = updates_factory([4, 4], [1, 1])
    fresh = get_aggregator("flora", flora_init="fresh")
    glob = get_aggregator("flora", flora_init="global")
    a = fresh.aggregate(second, fresh.aggregate(first, None))
    b = glob.aggregate(second, glob.aggregate(first, None))
    assert rel(dense(a.factors["q"]), dense(b.factors["q"])) > 1e-2


def test_client_start_plus_frozen_rest_is_exactly_the_global_adapter(gen):
    flora = get_aggregator("flora", rank_budget=6)
    global_adapter = flora.aggregate([make_update(gen, 5, 1), make_update(gen, 3, 1)], None)
    fresh = state_dict_from_factors(make_update(gen, 4, 1).factors)  # client rank 4
    scale = 0.5
    start, rest = start_from_global(state_dict_from_factors(global_adapter.factors), fresh,
                                    scale, rank=4)
    start_f = factors_from_state_dict(start, scale)
    rest_f = factors_from_state_dict(rest, 1.0)
    for module, g in global_adapter.factors.items():
        assert start_f[module].rank == 4 and rest_f[module].rank == 2
        assert rel(dense(start_f[module]) + dense(rest_f[module]), dense(g)) < 1e-6


def test_client_rank_above_the_global_rank_keeps_fresh_rows_and_no_rest(gen):
    flora = get_aggregator("flora", rank_budget=2)
    global_adapter = flora.aggregate([make_update(gen, 3, 1)], None)
    fresh_f = make_update(gen, 4, 1).factors
    fresh_f = {m: type(f)(A=f.A, B=torch.zeros_like(f.B), scale=1.0) for m, f in fresh_f.items()}
    start, rest = start_from_global(state_dict_from_factors(global_adapter.factors),
                                    state_dict_from_factors(fresh_f), 1.0, rank=4)
    assert rest == {}
    start_f = factors_from_state_dict(start, 1.0)
    for module, g in global_adapter.factors.items():
        assert torch.equal(start_f[module].A[2:], fresh_f[module].A[2:])
        assert rel(dense(start_f[module]), dense(g)) < 1e-6
