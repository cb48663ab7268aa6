"""An independent reference: TRL's ``SFTTrainer`` data path gives the same labels and the
same per-example loss as fedtune, for the same records and tokenizer.

TRL's prompt-completion conversational format with ``completion_only_loss`` is the
"train on the assistant's reply" convention. Its tokenised examples and its own
``compute_loss`` on one example at a time are compared with fedtune's labels and with the
loss fedtune's evaluation gives each example packed among the others. TRL is a test
dependency only (the ``dev`` extra).
"""

from __future__ import annotations

import pytest
import torch

from fedtune.data.chat import CHATML, encode_records, pack_records
from fedtune.data.records import Conversation
from fedtune.data.tokenize import IGNORE_INDEX
from fedtune.model.loading import load_tokenizer
from fedtune.model.tiny import build_byte_tokenizer
from fedtune.train.evaluate import evaluate

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = [("Hi, how are you?", "Good, thanks! And you?"),
         ("What did you do today?", "I went hiking with my sister."),
         ("Any plans for the weekend?", "Mostly reading, I think.")]


def _tiny_model(vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                         max_position_embeddings=512, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def _trl_trainer(tokenizer, model, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": p}],
             "completion": [{"role": "assistant", "content": r}]} for p, r in PAIRS]
    config = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], completion_only_loss=True,
                           packing=False, max_length=None, dataset_num_proc=None,
                           use_cpu=True, bf16=False, fp16=False)
    return trl.SFTTrainer(model=model, args=config, processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_list(rows))


def _own_losses(model, data, lengths: list[int]) -> list[float]:
    """Each example's loss, read from the packed block's logits."""
    with torch.no_grad():
        logits = model(input_ids=data.input_ids, position_ids=data.position_ids,
                       use_cache=False).logits
    losses, row, start = [], 0, 0
    for length in lengths:
        if start + length > data.input_ids.shape[1]:
            row, start = row + 1, 0
        span = slice(start, start + length)
        losses.append(float(torch.nn.functional.cross_entropy(
            logits[row, span][:-1], data.labels[row, span][1:], ignore_index=IGNORE_INDEX)))
        start += length
    return losses


@pytest.mark.parametrize("tokenizer_name", ["smollm2", "tiny-byte-chatml"])
def test_labels_and_per_example_loss_equal_trl(tokenizer_name, tmp_path) -> None:
    if tokenizer_name == "smollm2":
        tokenizer, template = load_tokenizer("smollm2"), "base"
    else:
        tokenizer, template = build_byte_tokenizer(), "chatml"
        tokenizer.chat_template = CHATML
    model = _tiny_model(len(tokenizer))
    trainer = _trl_trainer(tokenizer, model, tmp_path)
    records = [Conversation((("user", p), ("assistant", r))) for p, r in PAIRS]

    ours = encode_records(records, tokenizer, template, assistant_only=True)
    theirs = list(trainer.train_dataset)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.input_ids == reference["input_ids"]
        # the first label never counts (nothing predicts it); fedtune's packing ignores it
        assert mine.labels[1:] == reference["labels"][1:]

    model.eval()
    trl_losses = []
    with torch.no_grad():
        for example in theirs:
            batch = trainer.data_collator([{"input_ids": example["input_ids"],
                                            "labels": example["labels"]}])
            trl_losses.append(float(trainer.compute_loss(trainer.model, batch)))
    lengths = [len(e.input_ids) for e in ours]
    packed = pack_records(records, tokenizer, sum(lengths[:2]) + 1, template)
    assert len(packed) == 2  # two examples share a block: their losses must stay their own
    assert _own_losses(model, packed, lengths) == pytest.approx(trl_losses, abs=1e-5)
    total = evaluate(model, packed.input_ids, labels=packed.labels,
                     position_ids=packed.position_ids)
    counts = [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in theirs]
    weighted = sum(c * loss for c, loss in zip(counts, trl_losses, strict=True)) / sum(counts)
    assert total.tokens == sum(counts) and total.loss == pytest.approx(weighted, abs=1e-5)
