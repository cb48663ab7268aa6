"""One client training session without Flower, on the tiny config-built model: what it
sends back for each kind of order (plain, self-pruned, DP-SGD, distributed DP,
compressed), and that its training is exactly ``train_local`` from the shared seeded init."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.aggregation.hetlora import self_prune_rank
from fedtune.config import LoraSpec, ModelSpec, TrainConfig
from fedtune.core.codec import factors_from_state_dict
from fedtune.core.compress import CompressionSpec
from fedtune.model.lora import adapter_state, reset_lora
from fedtune.privacy import epsilon_after
from fedtune.train import train_local
from fedtune.train.dpsgd import SampleLevelDP
from fedtune.train.session import DpSgd, Kept, Orders, Trainee, TrainingSession
from fedtune.train.upload import ClientDP, prune_rank

RANK = 4
TRAINEE = Trainee(ModelSpec(source="tiny", quantization="none", device="cpu"),
                  LoraSpec(rank=RANK, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")),
                  TrainConfig(steps=2, batch_size=4, lr=5e-3), init_seed=0)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randint(0, 250, (12, 16), generator=torch.Generator().manual_seed(1))


def _ranks(state: dict[str, torch.Tensor]) -> set[int]:
    return {v.shape[0] if "lora_A" in k else v.shape[1] for k, v in state.items()}


def _weak_tail(keep: int) -> dict[str, torch.Tensor]:
    """A payload whose components past ``keep`` carry almost nothing."""
    gen = torch.Generator().manual_seed(5)
    shapes = {k: v.shape for k, v in _fresh_state().items()}
    out = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=gen) * 0.5
        if "lora_A" in key:
            value[keep:] *= 0.01
        else:
            value[:, keep:] *= 0.01
        out[key] = value
    return out


def _fresh_state() -> dict[str, torch.Tensor]:
    model, _ = TRAINEE.cached_model()
    reset_lora(model, TRAINEE.init_seed)
    return adapter_state(model)


def test_an_empty_payload_trains_from_the_seeded_init_and_sends_the_lora(data):
    result = TrainingSession(TRAINEE, seed=3).run(data)
    state = result.upload.state
    fresh = _fresh_state()
    assert state is not None and result.upload.blob is None
    assert state.keys() == fresh.keys() and _ranks(state) == {RANK}
    assert all(state[k].shape == fresh[k].shape for k in state)
    assert any(not torch.equal(state[k], fresh[k]) for k in state)  # it trained
    assert result.num_examples == data.shape[0] and result.train.steps == 2
    assert result.sample_epsilon is None and result.upload.update_norm is None


def test_the_session_trains_exactly_as_train_local_from_the_seeded_init(data):
    model, _ = TRAINEE.cached_model()
    reset_lora(model, TRAINEE.init_seed)
    direct = train_local(model, data, TRAINEE.train, 7, "cpu")
    expected = adapter_state(model)
    result = TrainingSession(TRAINEE, seed=7).run(data)
    assert result.train.loss == direct.loss
    assert all(torch.equal(result.upload.state[k], expected[k]) for k in expected)


def test_a_payload_is_the_start_and_the_update_is_measured_from_it(data):
    payload = _weak_tail(RANK)
    session = TrainingSession(TRAINEE, seed=3, payload=payload)
    session.prepare()
    assert all(torch.equal(session.start[k], payload[k]) for k in payload)
    assert all(torch.equal(adapter_state(session.model)[k], payload[k]) for k in payload)


def test_self_pruning_shrinks_the_rank_as_prune_rank_says(data):
    session = TrainingSession(TRAINEE, seed=3, payload=_weak_tail(2),
                              orders=Orders(prune_gamma=0.5))
    result = session.run(data)
    trained = adapter_state(session.model)
    keep = self_prune_rank(factors_from_state_dict(trained, TRAINEE.lora.scale), 0.5)
    assert keep == 2 < RANK
    assert _ranks(result.upload.state) == {keep}
    expected = prune_rank(trained, TRAINEE.lora.scale, 0.5)
    assert all(torch.equal(result.upload.state[k], expected[k]) for k in expected)


def test_without_a_weak_tail_pruning_keeps_the_rank(data):
    result = TrainingSession(TRAINEE, seed=3, payload=_weak_tail(RANK),
                             orders=Orders(prune_gamma=0.5)).run(data)
    assert _ranks(result.upload.state) == {RANK}


def test_dpsgd_reports_the_accountants_sample_epsilon_and_keeps_its_history(data):
    dpsgd = DpSgd(SampleLevelDP(clip_norm=1.0, noise_multiplier=1.5), delta=1e-5)
    rate = TRAINEE.train.batch_size / data.shape[0]
    first = TrainingSession(TRAINEE, seed=3, orders=Orders(dpsgd=dpsgd)).run(data)
    assert first.dpsgd_history == [(1.5, rate, 2)]
    assert first.sample_epsilon == epsilon_after([(1.5, rate, 2)], 1e-5)
    again = TrainingSession(TRAINEE, seed=4, orders=Orders(dpsgd=dpsgd),
                            kept=Kept(dpsgd_history=first.dpsgd_history)).run(data)
    assert again.dpsgd_history == [(1.5, rate, 2)] * 2
    assert again.sample_epsilon == epsilon_after([(1.5, rate, 2)] * 2, 1e-5)
    assert again.sample_epsilon > first.sample_epsilon
    plain = TrainingSession(TRAINEE, seed=3).run(data)
    assert plain.train.loss != first.train.loss  # DP-SGD, not train_local, trained


def test_distributed_dp_clips_the_update_of_the_released_factors(data):
    clip = 1e-3
    session = TrainingSession(TRAINEE, seed=3,
                              orders=Orders(client_dp=ClientDP(clip, 0.0, fields=("B",))))
    result = session.run(data)
    state, start = result.upload.state, session.start
    assert result.upload.update_norm > clip  # the trained update was larger: it was clipped
    moved = math.sqrt(sum(float((state[k] - start[k]).pow(2).sum()) for k in state
                          if "lora_B" in k))
    assert moved == pytest.approx(clip, rel=1e-4)
    trained = adapter_state(session.model)
    assert all(torch.equal(state[k], trained[k]) for k in state if "lora_A" in k)


def test_a_compressed_upload_carries_its_residual_into_the_next_round(data):
    orders = Orders(upload=CompressionSpec(density=0.25, values="int8"))
    first = TrainingSession(TRAINEE, seed=3, orders=orders).run(data)
    assert first.upload.state is None and first.upload.blob is not None
    assert first.upload.residual_norm_in == 0.0
    residual = first.upload.residual
    assert residual and any(float(r.abs().sum()) > 0 for r in residual.values())
    again = TrainingSession(TRAINEE, seed=3, orders=orders, kept=Kept(residual=residual)
                            ).run(data)
    norm = math.sqrt(sum(float(r.pow(2).sum()) for r in residual.values()))
    assert again.upload.residual_norm_in == pytest.approx(norm)
    no_feedback = Orders(upload=orders.upload, error_feedback=False)
    assert TrainingSession(TRAINEE, seed=3, orders=no_feedback).run(data).upload.residual is None


def test_a_rounded_start_sends_the_update_even_when_dense(data):
    result = TrainingSession(TRAINEE, seed=3, orders=Orders(rounded_start=True)).run(data)
    assert result.upload.state is None and result.upload.blob is not None


def test_training_before_preparing_is_refused(data):
    with pytest.raises(RuntimeError, match="before prepare"):
        TrainingSession(TRAINEE, seed=3).train(data)
