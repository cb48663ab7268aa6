"""Evaluation: token-weighted loss, perplexity and combining results."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedtune.train import EvalResult, combine, evaluate


def manual_sum_and_count(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Reference next-token cross-entropy via log_softmax and gather, summed over targets."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        for pos in range(ids.shape[1] - 1):
            target = int(labels[row, pos + 1])
            if target != -100:
                total -= float(logp[row, pos, target])
                count += 1
    return total, count


def test_loss_is_token_weighted_over_uneven_batches(model, random_blocks) -> None:
    ids = random_blocks[:5]
    labels = ids.clone()
    labels[:2, 4:] = -100  # first batch has far fewer targets than the rest
    total, count = manual_sum_and_count(model, ids, labels)
    result = evaluate(model, ids, batch_size=2, device="cpu", labels=labels)
    assert result.tokens == count == 2 * 3 + 3 * 15
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    batch_means = []
    for start in range(0, 5, 2):
        s, c = manual_sum_and_count(model, ids[start : start + 2], labels[start : start + 2])
        batch_means.append(s / c)
    assert abs(result.loss - sum(batch_means) / len(batch_means)) > 1e-3  # not a batch mean


def test_matches_model_loss_and_batch_size_does_not_matter(model, random_blocks) -> None:
    with torch.no_grad():
        hf_loss = float(model(input_ids=random_blocks, labels=random_blocks).loss)
    results = [evaluate(model, random_blocks, batch_size=b, device="cpu") for b in (1, 5, 12)]
    for result in results:
        assert result.loss == pytest.approx(hf_loss, rel=1e-5)
        assert result.tokens == 12 * 15


def test_restores_training_mode(model, random_blocks) -> None:
    model.train()
    evaluate(model, random_blocks, batch_size=4)
    assert model.training
    with pytest.raises(ValueError, match="non-empty"):
        evaluate(model, random_blocks[:0], batch_size=4)


def test_combine_is_token_weighted(model, random_blocks) -> None:
    a = evaluate(model, random_blocks[:2], batch_size=4)
    b = evaluate(model, random_blocks[2:], batch_size=4)
    merged = combine([a, b])
    whole = evaluate(model, random_blocks, batch_size=4)
    assert merged.tokens == whole.tokens == a.tokens + b.tokens
    assert merged.loss == pytest.approx(whole.loss, rel=1e-5)
    assert merged.perplexity == pytest.approx(math.exp(merged.loss))
    manual = combine([EvalResult(1.0, math.e, 10), EvalResult(4.0, math.e**4, 30)])
    assert manual.loss == pytest.approx(3.25) and manual.tokens == 40
    with pytest.raises(ValueError):
        combine([])


def test_cross_entropy_reference_agrees_with_torch(model, random_blocks) -> None:
    ids = random_blocks[:2]
    total, count = manual_sum_and_count(model, ids, ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert total / count == pytest.approx(float(expected), rel=1e-5)
