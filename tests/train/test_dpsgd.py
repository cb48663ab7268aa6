"""DP-SGD through Opacus on a tiny peft model: trains, draws its batches and noise from OS
entropy unless asked for a reproducible run, clips every example's gradient (one
outlier cannot move the update further than the clip norm allows; one added chat or
padded sequence moves the clipped sum by at most C), leaves no hooks."""

import pytest
import torch

from fedtune.config import LoraSpec, ModelSpec, TrainConfig
from fedtune.data.tokenize import IGNORE_INDEX, Example, PackedData, pack_examples
from fedtune.model.cache import get_peft_model
from fedtune.model.lora import adapter_state, reset_lora
from fedtune.train.dpsgd import SampleLevelDP, _poisson_rows, per_sequence_loss, train_local_dpsgd

CFG = TrainConfig(steps=4, batch_size=6, lr=1e-2)


@pytest.fixture(scope="module")
def model():
    m, _ = get_peft_model(ModelSpec(source="tiny", quantization="none", device="cpu"),
                          LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")), 0)
    return m


def _run(model, seed: int, dp: SampleLevelDP, reproducible: bool = True
         ) -> dict[str, torch.Tensor]:
    reset_lora(model, 0)
    data = torch.randint(0, 250, (40, 24), generator=torch.Generator().manual_seed(1))
    train_local_dpsgd(model, data, CFG, dp, seed=seed, reproducible=reproducible)
    return adapter_state(model)


def test_a_reproducible_run_is_seeded_and_moves_the_lora(model):
    dp = SampleLevelDP(clip_norm=0.5, noise_multiplier=1.0)
    reset_lora(model, 0)
    start = adapter_state(model)
    first, again, other = _run(model, 3, dp), _run(model, 3, dp), _run(model, 4, dp)
    assert any(not torch.equal(first[k], start[k]) for k in first)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_by_default_the_same_seed_gives_another_run(model):
    """Batches and noise from OS entropy: whoever knows the seed cannot redo them."""
    dp = SampleLevelDP(clip_norm=0.5, noise_multiplier=1.0)
    first, again = _run(model, 3, dp, False), _run(model, 3, dp, False)
    assert any(not torch.equal(first[k], again[k]) for k in first)


def test_poisson_batches_come_from_os_entropy_unless_seeded():
    secure = [_poisson_rows(1000, 0.5, None) for _ in range(2)]
    seeded = [_poisson_rows(1000, 0.5, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert not torch.equal(*secure)
    assert torch.equal(*seeded)
    assert 400 < secure[0].numel() < 600  # each row joins with probability 0.5


def test_dpsgd_leaves_the_cached_model_clean(model):
    _run(model, 0, SampleLevelDP(clip_norm=1.0, noise_multiplier=0.5))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps the gradient it was handed: DP-SGD's privatised gradient."""

    handed: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.handed.append([p.grad.detach().clone() for g in self.param_groups
                            for p in g["params"]])
        return super().step(closure)


def _privatised_gradient(model, data, dp, monkeypatch) -> torch.Tensor:
    """The first step's gradient as DP-SGD hands it to AdamW (every row in the batch)."""
    monkeypatch.setattr(torch.optim, "AdamW", _RecordingAdamW)
    _RecordingAdamW.handed = []
    reset_lora(model, 0)
    one_step = TrainConfig(steps=1, batch_size=data.shape[0], lr=1e-2)
    train_local_dpsgd(model, data, one_step, dp, seed=5)
    return torch.cat([g.flatten() for g in _RecordingAdamW.handed[0]])


def _example_gradient(model, sequence) -> torch.Tensor:
    """One example's unclipped gradient, by plain autograd (independent of Opacus)."""
    reset_lora(model, 0)
    model.train()
    ids = sequence.unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    model.eval()
    return grad


def test_one_outlier_moves_the_gradient_by_at_most_the_clip_norm(model, monkeypatch):
    """Replace one example of a 4-example batch by an outlier (one token repeated): with
    almost no noise, the privatised gradient moves by at most 2 C / 4, while the two
    examples' own gradients differ by far more. Without per-sample clipping it moves by
    their difference / 4 and the bound fails."""
    data = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(1))
    outlier = data.clone()
    outlier[0] = 7
    raw_gap = float((_example_gradient(model, outlier[0])
                     - _example_gradient(model, data[0])).norm())
    clip = raw_gap / 100
    dp = SampleLevelDP(clip_norm=clip, noise_multiplier=1e-6)
    moved = float((_privatised_gradient(model, outlier, dp, monkeypatch)
                   - _privatised_gradient(model, data, dp, monkeypatch)).norm())
    assert moved <= 2 * clip / 4 * (1 + 1e-3)
    assert raw_gap / 4 > 10 * (2 * clip / 4)  # unclipped, the move would break the bound


def test_bad_dpsgd_settings():
    with pytest.raises(ValueError, match="clip norm"):
        SampleLevelDP(clip_norm=0, noise_multiplier=1)
    with pytest.raises(ValueError, match="noise multiplier"):
        SampleLevelDP(clip_norm=1, noise_multiplier=0)


# --- One added sequence moves the clipped sum by at most C (issue 30) -------------------

@pytest.fixture(scope="module")
def still_model():
    """The peft model without LoRA dropout (another cache entry: seed 1), so that rows
    with the same tokens have the same gradient."""
    m, _ = get_peft_model(ModelSpec(source="tiny", quantization="none", device="cpu"),
                          LoraSpec(rank=4, alpha=8, dropout=0.0,
                                   target_modules=("q_proj", "v_proj")), 1)
    return m


def _clipped_sum(model, ids, labels, positions, dp, monkeypatch) -> torch.Tensor:
    """The clipped sum of the batch's per-sample gradients, as the training step forms it:
    one step over every row (rate 1), its privatised gradient times the expected batch size.
    The noise is seeded, so it is the same draw for neighbouring batches and cancels in
    their difference."""
    monkeypatch.setattr(torch.optim, "AdamW", _RecordingAdamW)
    _RecordingAdamW.handed = []
    reset_lora(model, 0)
    rows = ids.shape[0]
    one_step = TrainConfig(steps=1, batch_size=rows, lr=1e-2)
    train_local_dpsgd(model, ids, one_step, dp, seed=5, reproducible=True, labels=labels,
                      position_ids=positions)
    return torch.cat([g.flatten() for g in _RecordingAdamW.handed[0]]) * rows


def _sequence_gradient_norm(model, ids, labels, positions) -> float:
    """One sequence alone: its own token-mean loss's gradient, by plain autograd."""
    reset_lora(model, 0)
    model.train()
    inputs = {"input_ids": ids[None], "labels": labels[None]}
    if positions is not None:
        inputs |= {"position_ids": positions[None], "use_cache": False}
    model(**inputs).loss.backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).norm()
    model.zero_grad(set_to_none=True)
    model.eval()
    return float(norm)


def _chat_batch(rows: int):
    """``rows`` copies of one exchange whose answer is 3 tokens (assistant-only labels,
    packed whole as chat data is), and a neighbour with a 22-token answer added."""
    tokens = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(2)).tolist()
    short = Example(tokens[0], [IGNORE_INDEX] * 20 + tokens[0][20:])
    long = Example(tokens[1], [IGNORE_INDEX] * 2 + tokens[1][2:])
    return pack_examples([short] * rows, 24, 0), pack_examples([short] * rows + [long], 24, 0)


def _padded_batch(rows: int):
    """``rows`` copies of a 5-token text padded to 24, and a neighbour with a full block."""
    ids = torch.randint(0, 250, (rows + 1, 24), generator=torch.Generator().manual_seed(3))
    ids[:rows] = ids[0]
    ids[:rows, 5:] = 0
    labels = ids.clone()
    labels[:rows, 5:] = IGNORE_INDEX
    return PackedData(ids[:rows], labels[:rows]), PackedData(ids, labels)


@pytest.mark.parametrize("batches", [_chat_batch, _padded_batch], ids=["chat", "padded"])
def test_one_added_sequence_moves_the_clipped_sum_by_at_most_c(still_model, monkeypatch,
                                                                batches):
    """C just above each of the repeated rows' gradient norm, so they go unclipped: with
    each sequence's loss its own mean over its labelled tokens, adding one sequence adds
    one clipped gradient and nothing else. Averaging the loss over the batch's tokens
    instead rescales every other row by the tokens the new one brings (about 2.8 C of
    move in both batches here)."""
    model = still_model
    batch, neighbour = batches(8)
    norm = _sequence_gradient_norm(model, batch.input_ids[0], batch.labels[0],
                                   None if batch.position_ids is None else batch.position_ids[0])
    dp = SampleLevelDP(clip_norm=1.05 * norm, noise_multiplier=1e-6)
    before = _clipped_sum(model, batch.input_ids, batch.labels, batch.position_ids, dp,
                          monkeypatch)
    after = _clipped_sum(model, neighbour.input_ids, neighbour.labels, neighbour.position_ids,
                         dp, monkeypatch)
    assert float(before.norm()) > 7 * dp.clip_norm  # eight unclipped, aligned rows
    assert float((after - before).norm()) <= dp.clip_norm * (1 + 1e-4)


def test_a_sequence_without_labelled_tokens_adds_nothing(still_model, monkeypatch):
    """A block that is all padding (or all prompt) has no loss of its own: adding it leaves
    the clipped sum as it was, where a batch-mean loss rescaled every other row."""
    model = still_model
    batch, _ = _padded_batch(8)
    ids = torch.cat([batch.input_ids, batch.input_ids[:1]])
    labels = torch.cat([batch.labels, torch.full_like(batch.labels[:1], IGNORE_INDEX)])
    dp = SampleLevelDP(clip_norm=1.0, noise_multiplier=1e-6)
    before = _clipped_sum(model, batch.input_ids, batch.labels, None, dp, monkeypatch)
    after = _clipped_sum(model, ids, labels, None, dp, monkeypatch)
    assert float((after - before).norm()) <= 1e-5 * float(before.norm())


def test_per_sequence_loss_is_each_rows_own_token_mean(model):
    """Row by row it is transformers' loss of that row alone; a row with no labelled token
    scores 0 (not NaN, which would poison the batch's gradient)."""
    ids = torch.randint(0, 250, (3, 16), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, 6:] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX
    with torch.no_grad():
        losses = per_sequence_loss(model(input_ids=ids).logits, labels)
        alone = [float(model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss)
                 for i in range(2)]
    assert losses.shape == (3,)
    assert torch.allclose(losses[:2], torch.tensor(alone), atol=1e-5)
    assert float(losses[2]) == 0.0
