"""Examples packed whole do not see each other: every example's logits in a packed block
equal its logits alone, and its loss is its own."""

from __future__ import annotations

import torch

from fedtune.data.chat import CHATML, encode_conversation
from fedtune.data.records import Conversation
from fedtune.data.tokenize import IGNORE_INDEX, pack_examples, pack_naively
from fedtune.model.tiny import build_tiny_model
from fedtune.train.evaluate import evaluate
from fedtune.train.local import packed_inputs

CONVERSATIONS = [
    Conversation((("user", "Hi"), ("assistant", "Hello there."))),
    Conversation((("system", "Be kind."), ("user", "How are you?"), ("assistant", "Well."))),
    Conversation((("user", "Name a colour."), ("assistant", "Blue."))),
]


def _examples(tokenizer):
    return [encode_conversation(c, tokenizer, CHATML, assistant_only=True)
            for c in CONVERSATIONS]


@torch.no_grad()
def test_packed_logits_equal_each_example_alone() -> None:
    model, tokenizer = build_tiny_model(0)
    model.eval()
    examples = _examples(tokenizer)
    seq_len = sum(len(e.input_ids) for e in examples) + 5
    packed = pack_examples(examples, seq_len, pad_id=tokenizer.pad_token_id)
    assert len(packed) == 1  # all three share one block, padded
    logits = model(**packed_inputs(packed.input_ids, packed.position_ids)).logits[0]
    naive = model(input_ids=packed.input_ids).logits[0]
    start = 0
    for number, example in enumerate(examples):
        alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
        end = start + len(example.input_ids)
        torch.testing.assert_close(logits[start:end], alone, atol=1e-5, rtol=1e-5)
        if number:  # attending across the boundary (naive packing) changes the logits
            assert not torch.allclose(naive[start:end], alone, atol=1e-3)
        start = end


def test_packed_loss_is_the_mean_of_the_examples_own_assistant_losses() -> None:
    model, tokenizer = build_tiny_model(0)
    examples = _examples(tokenizer)
    seq_len = len(examples[0].input_ids) + len(examples[1].input_ids) + 1  # two share a block
    packed = pack_examples(examples, seq_len, pad_id=tokenizer.pad_token_id)
    assert 1 < len(packed) < len(examples)
    result = evaluate(model, packed.input_ids, labels=packed.labels,
                      position_ids=packed.position_ids)
    total, count = 0.0, 0
    for example in examples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0]
        targets = torch.tensor(example.labels[1:])
        total += float(torch.nn.functional.cross_entropy(
            logits[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    assert result.tokens == count
    assert abs(result.loss - total / count) < 1e-5


def test_examples_are_kept_whole_in_order_and_blocks_padded() -> None:
    _, tokenizer = build_tiny_model(0)
    examples = _examples(tokenizer)
    lengths = [len(e.input_ids) for e in examples]
    seq_len = lengths[0] + lengths[1] - 1  # the second example does not fit after the first
    packed = pack_examples(examples, seq_len, pad_id=tokenizer.pad_token_id)
    assert packed.input_ids[0, : lengths[0]].tolist() == examples[0].input_ids
    assert bool((packed.labels[0, lengths[0]:] == IGNORE_INDEX).all())  # padding
    assert packed.input_ids[1, : lengths[1]].tolist() == examples[1].input_ids
    assert packed.position_ids[1, : lengths[1]].tolist() == list(range(lengths[1]))
    naive = pack_naively(examples, seq_len)
    assert naive.position_ids is None and naive.input_ids.numel() <= sum(lengths)


def test_dpsgd_loss_ignores_masked_tokens() -> None:
    """Tokens labelled -100 after the last labelled one cannot change a DP-SGD update
    (causal attention keeps them out of every scored prediction) unless they are
    scored: changing them must leave the trained LoRA exactly as it was."""
    from fedtune.config import LoraSpec, ModelSpec, TrainConfig
    from fedtune.model.cache import get_peft_model
    from fedtune.model.lora import adapter_state, reset_lora
    from fedtune.train.dpsgd import SampleLevelDP, train_local_dpsgd

    model, _ = get_peft_model(ModelSpec(source="tiny", quantization="none", device="cpu"),
                              LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")), 0)
    ids = torch.randint(0, 250, (12, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, 12:] = IGNORE_INDEX
    other = ids.clone()
    other[:, 12:] = (ids[:, 12:] + 7) % 250

    def trained(sequences: torch.Tensor, targets: torch.Tensor | None) -> dict:
        reset_lora(model, 0)
        train_local_dpsgd(model, sequences, TrainConfig(steps=2, batch_size=4, lr=1e-2),
                          SampleLevelDP(clip_norm=0.5, noise_multiplier=1.0), seed=3,
                          reproducible=True, labels=targets)
        return adapter_state(model)

    first, second = trained(ids, labels), trained(other, labels)
    assert all(torch.equal(first[k], second[k]) for k in first)
    unmasked = trained(other, None)
    assert any(not torch.equal(first[k], unmasked[k]) for k in first)
