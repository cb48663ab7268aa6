"""The reply functions on their own, without a Grid or a strategy: a train reply's
content in, a ClientUpdate (or the reason it is dropped) out."""

import math

import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from fedtune.core.adapters import LoraFactors
from fedtune.core.codec import A_SUFFIX, B_SUFFIX, state_dict_from_factors
from fedtune.core.compress import CompressionSpec
from fedtune.core.init import seeded_lora_state
from fedtune.flower import messages as keys
from fedtune.flower import replies
from fedtune.planning.client_settings import ClientSettings

MODULES = {"base_model.model.layer.0.q": (6, 5), "base_model.model.layer.0.v": (6, 3)}
SEED = 7
RANK, ALPHA = 2, 4.0


def _settings(rank=RANK, alpha=ALPHA):
    return ClientSettings(partition=3, profile="", rank=rank, alpha=alpha,
                          quantization="none", batch_size=1, seq_len=8)


def _rules(**changes):
    values = dict(expected=MODULES, run_seed=SEED, client_mode="continue", flora_init="fresh")
    return replies.TrainRules(**{**values, **changes})


def _start_state(rank=RANK):
    """Round 1 of continue mode: every client starts from the seeded init."""
    shapes = {}
    for name, (inp, out) in MODULES.items():
        shapes[name + A_SUFFIX], shapes[name + B_SUFFIX] = (rank, inp), (out, rank)
    return seeded_lora_state(SEED, shapes)


def _moved(step=0.1, rank=RANK):
    gen = torch.Generator().manual_seed(0)
    return {k: v + step * torch.randn(v.shape, generator=gen)
            for k, v in _start_state(rank).items()}


def _content(state, packed=False, **metrics):
    record = (keys.encode_record(state, CompressionSpec(density=0.5)) if packed
              else keys.state_to_record(state))
    numbers = {keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 1.5, **metrics}
    return RecordDict({keys.ADAPTER: record, keys.METRICS: MetricRecord(numbers)})


def test_a_dense_reply_becomes_an_update_of_its_client_at_its_scale():
    state = _moved()
    update = replies.train_update(_content(state), _settings(), _rules())
    assert update.client_id == "3" and update.num_examples == 10
    assert update.metrics["rank"] == RANK and update.start is None and update.masks is None
    for name, f in update.factors.items():
        assert f.scale == ALPHA / RANK
        assert torch.equal(f.A, state[name + A_SUFFIX]) and torch.equal(f.B, state[name + B_SUFFIX])


def test_the_rebuilt_start_is_the_seeded_init_the_client_trained_from():
    start = replies.client_start_state(_settings(), _moved(), _rules())
    expected = _start_state()
    assert start.keys() == expected.keys()
    assert all(torch.equal(start[k], expected[k]) for k in expected)
    kept = replies.train_update(_content(_moved()), _settings(), _rules(keep_start=True)).start
    assert kept is not None and torch.equal(kept["base_model.model.layer.0.q"].A,
                                            expected["base_model.model.layer.0.q" + A_SUFFIX])


def test_a_packed_reply_is_an_update_added_to_the_start():
    start = _start_state()
    delta = {k: v - start[k] for k, v in _moved().items()}
    update = replies.train_update(_content(delta, packed=True), _settings(), _rules())
    assert update.masks is not None and update.start is not None
    for name, f in update.factors.items():
        mask = update.masks[name]
        sent_a = delta[name + A_SUFFIX] * mask.A
        torch.testing.assert_close(f.A, start[name + A_SUFFIX] + sent_a)


def test_the_update_norm_bound_drops_a_reply_that_moved_too_far():
    near = replies.train_update(_content(_moved(0.01)), _settings(),
                                _rules(max_update_norm=1.0))
    assert near.start is not None
    with pytest.raises(ValueError, match="exceeds federation.max_update_norm = 1"):
        replies.train_update(_content(_moved(10.0)), _settings(), _rules(max_update_norm=1.0))


@pytest.mark.parametrize(("metrics", "reason"), [
    ({keys.NUM_EXAMPLES: 0}, "num-examples must be positive"),
    ({keys.NUM_EXAMPLES: 10**6}, "exceeds federation.max_examples = 1000"),
    ({keys.TRAIN_LOSS: math.inf}, "train-loss must be a finite number"),
])
def test_metrics_a_client_cannot_be_believed_drop_the_reply(metrics, reason):
    with pytest.raises(ValueError, match=reason):
        replies.train_update(_content(_moved(), **metrics), _settings(),
                             _rules(max_examples=1000))


def test_a_reply_at_another_rank_is_dropped_unless_pruning_allows_a_smaller_one():
    smaller = _content(_moved(rank=1))
    with pytest.raises(ValueError, match="instead of the assigned rank 2"):
        replies.train_update(smaller, _settings(), _rules())
    pruned = replies.train_update(smaller, _settings(), _rules(pruning=True))
    assert pruned.metrics["rank"] == 1


def test_update_norm_is_the_move_from_the_start_over_every_factor():
    start = {"m": LoraFactors(A=torch.zeros(2, 3), B=torch.zeros(4, 2), scale=1.0)}
    final = {"m": LoraFactors(A=torch.full((2, 3), 1.0), B=torch.full((4, 2), 2.0), scale=1.0)}
    assert replies.update_norm(final, start) == pytest.approx(math.sqrt(6 + 8 * 4))
    pruned = {"m": LoraFactors(A=torch.ones(1, 3), B=torch.ones(4, 1), scale=1.0)}
    assert replies.update_norm(pruned, start) == pytest.approx(math.sqrt(3 + 4))


def test_sent_masks_say_which_entries_a_packed_reply_carried():
    f = LoraFactors(A=torch.ones(2, 3), B=torch.ones(4, 2), scale=1.0)
    name = "m"
    assert replies.sent_masks({name + A_SUFFIX: None, name + B_SUFFIX: None}, {name: f}) is None
    only_a = torch.tensor([[True, False, True], [False, False, True]])
    masks = replies.sent_masks({name + A_SUFFIX: only_a, name + B_SUFFIX: None}, {name: f})
    assert torch.equal(masks[name].A, only_a) and bool(masks[name].B.all())


def test_short_reason_keeps_the_clients_own_message():
    wrapped = ("Traceback (most recent call last):\n ...\nException ClientAppException "
               "occurred. Message: CUDA out of memory\nmore lines'>")
    assert replies.short_reason(wrapped) == "CUDA out of memory"
    assert replies.short_reason(None) == "unknown error"
    assert len(replies.short_reason("x" * 1000)) == 300


def test_every_check_runs_on_state_dicts_of_factors():
    factors = {n: LoraFactors(A=torch.zeros(RANK, i), B=torch.zeros(o, RANK), scale=2.0)
               for n, (i, o) in MODULES.items()}
    state = state_dict_from_factors(factors)
    update = replies.train_update(_content(state), _settings(), _rules())
    assert set(update.factors) == set(MODULES)
