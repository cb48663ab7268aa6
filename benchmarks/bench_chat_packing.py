"""Training throughput of chat examples packed whole (fedtune's choice) vs naive packing
vs one example per padded row, on chit-chat exchanges rendered with a chat template.

- whole: examples packed in order without splitting, position ids restarting per
  example (block-diagonal attention), the rest of a block padded (fedtune.data.chat);
- naive: the rendered token stream cut into full blocks, tokens attending across
  examples (what running chat text through plain-text packing would do);
- padded: one example per row, padded to seq_len.

Reported: real (non-padding) tokens per second and assistant-label tokens per second of
LoRA training (``train_local``), best of ``--repeats`` interleaved runs (the load of a
shared machine varies), and the share of padding. Run:

    .venv/bin/python benchmarks/bench_chat_packing.py --model tiny --tokenizer smollm2
    .venv/bin/python benchmarks/bench_chat_packing.py --model smollm2 --steps 6
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from fedtune.config import LoraSpec, ModelSpec, TrainConfig
from fedtune.data import load_clients
from fedtune.data.chat import encode_records
from fedtune.data.tokenize import IGNORE_INDEX, PackedData, pack_examples, pack_naively, pad_id_of
from fedtune.model.cache import get_peft_model
from fedtune.model.loading import load_tokenizer
from fedtune.train.local import train_local


def layouts(examples: list, seq_len: int, pad_id: int) -> dict[str, PackedData]:
    """The three ways to lay the same examples out in [n, seq_len] rows."""
    padded = [pack_examples([e], seq_len, pad_id) for e in examples]
    return {"whole": pack_examples(examples, seq_len, pad_id),
            "naive": pack_naively(examples, seq_len),
            "padded": PackedData.cat(padded)}


def real_tokens(data: PackedData, pad_id: int) -> int:
    """Tokens that are not block padding (padding is labelled -100 and sits at row ends)."""
    if data.position_ids is None:
        return data.input_ids.numel()
    ends = (data.labels != IGNORE_INDEX).int().flip(1).argmax(1)  # last labelled per row
    return int(sum(data.input_ids.shape[1] - int(e) for e in ends))


def lora_model(source: str, tokenizer_source: str) -> tuple[Any, Any]:
    """The base with a LoRA on q/v. ``tiny`` with another tokenizer: a two-layer Llama
    with that tokenizer's vocabulary, so examples have their real lengths while the
    model stays small enough for a CPU."""
    lora = LoraSpec(rank=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"))
    if source != "tiny" or tokenizer_source == "tiny":
        return get_peft_model(ModelSpec(source=source, quantization="none", device="cpu"),
                              lora, 0)
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer_source)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048))
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                             target_modules=list(lora.target_modules))
    return peft.get_peft_model(base, config), tokenizer


def measure(model, data: PackedData, pad_id: int, cfg: TrainConfig) -> dict[str, float]:
    train_local(model, data.input_ids, TrainConfig(steps=1, batch_size=cfg.batch_size),
                labels=data.labels, position_ids=data.position_ids)  # warm-up
    began = time.perf_counter()
    result = train_local(model, data.input_ids, cfg, labels=data.labels,
                         position_ids=data.position_ids)
    seconds = time.perf_counter() - began
    rows = cfg.steps * cfg.batch_size
    per_row = real_tokens(data, pad_id) / len(data)
    return {"rows": len(data), "padding": 1 - per_row / data.input_ids.shape[1],
            "tokens_per_s": rows * per_row / seconds, "labels_per_s": result.tokens / seconds,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or smollm2")
    parser.add_argument("--tokenizer", default="smollm2",
                        help="with --model tiny: whose tokenizer (smollm2 or tiny)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer = lora_model(args.model, args.tokenizer)
    records = [r for c in load_clients("chitchat", num_clients=args.clients, seed=0,
                                       max_samples_per_client=64) for r in c.train]
    examples = encode_records(records, tokenizer, "base", assistant_only=True)
    pad_id = pad_id_of(tokenizer)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3)
    print(f"{args.model} (tokenizer {args.tokenizer}): {len(examples)} exchanges, mean "
          f"{sum(len(e.input_ids) for e in examples) / len(examples):.0f} tokens, "
          f"seq_len {args.seq_len}, {args.steps} steps x {args.batch_size} rows, "
          f"{torch.get_num_threads()} threads")
    print("| layout | rows | padding | real tokens/s | assistant tokens/s |")
    print("|---|---|---|---|---|")
    arranged = layouts(examples, args.seq_len, pad_id)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in arranged}
    for _ in range(args.repeats):  # interleaved, best of: a shared machine's load varies
        for name, data in arranged.items():
            runs[name].append(measure(model, data, pad_id, cfg))
    for name, measured in runs.items():
        m = max(measured, key=lambda r: r["tokens_per_s"])
        print(f"| {name} | {m['rows']} | {m['padding']:.1%} | {m['tokens_per_s']:.0f} | "
              f"{m['labels_per_s']:.0f} |")


if __name__ == "__main__":
    main()
