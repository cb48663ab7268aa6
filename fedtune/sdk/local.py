"""Local-only training: personalisation on one device's data, no server.

The same pieces as a federated client (cached base, seeded LoRA, the local training
loop, the held-out loss) with the settings of the federation's scenario when the
client names one, else the bundled default's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.config import load_scenario
from fedtune.data import pack, pack_texts
from fedtune.data.partition import split_train_eval
from fedtune.data.types import DataError

if TYPE_CHECKING:
    from fedtune.sdk.client import Client, ProgressCallback


@dataclass(frozen=True)
class LocalResult:
    """A locally trained adapter (a peft folder) and what training did to the held-out
    loss of this device's own texts."""

    adapter: Path
    train_loss: float
    eval_loss_before: float
    eval_loss_after: float
    steps: int


def train_alone(client: Client, steps: int | None, lr: float | None, rank: int | None,
                out: Path, on_progress: ProgressCallback | None = None) -> LocalResult:
    """Train a fresh LoRA on ``client``'s texts (one held out) and save it to ``out``."""
    from fedtune.model.cache import get_peft_model, give_back
    from fedtune.model.loading import ModelSpec, base_model_name, register_model
    from fedtune.model.lora import (
        activate,
        adapter_name,
        adapter_state,
        reset_lora,
        save_peft_adapter,
    )
    from fedtune.sdk.client import _ONE_AT_A_TIME, Progress
    from fedtune.train import evaluate, train_local

    scenario = client.federation or load_scenario(None)
    lent = client.model is not None and not isinstance(client.model, str)
    source = (register_model(client.model, client.tokenizer) if lent
              else client.model or scenario.model.source)
    lora = scenario.lora
    if rank is not None:
        lora = dataclasses.replace(lora, rank=rank, alpha=lora.scale * rank)
    config = dataclasses.replace(scenario.train, steps=steps or scenario.train.steps,
                                 lr=lr or scenario.train.lr)
    spec = ModelSpec(source=source, quantization="none" if lent else scenario.model.quantization,
                     device=scenario.model.device)
    seed = scenario.run.seed
    with _ONE_AT_A_TIME:
        try:
            model, tokenizer = get_peft_model(spec, lora, seed)
            reset_lora(model, seed)
            activate(model, adapter_name(lora))
            texts, held = split_train_eval(client.texts, scenario.data.eval_fraction,
                                           f"{seed}:{client.name}")
            blocks = pack_texts(texts, tokenizer, scenario.data.seq_len)
            if blocks.shape[0] == 0:
                raise DataError(f"the texts give no full training sequence of "
                                f"{scenario.data.seq_len} tokens; give more text")
            held_out = pack(held, tokenizer, scenario.data.seq_len, pad_last=True)

            def held_out_loss() -> float:
                return float(evaluate(model, held_out.input_ids, config.batch_size,
                                      labels=held_out.labels).loss)

            def on_step(done: int, loss: float) -> None:
                if on_progress is not None:
                    on_progress(Progress("step", f"step {done}/{config.steps} loss {loss:.4f}",
                                         0, done, config.steps, loss))

            before = held_out_loss()
            result = train_local(model, blocks, config, seed, on_step=on_step)
            after = held_out_loss()
            save_peft_adapter(out, adapter_state(model), lora,
                              base_model_name(spec) if not lent else
                              str(getattr(client.model.config, "_name_or_path", "")))
        finally:
            if lent:
                give_back(source)
    return LocalResult(out, float(result.loss), before, after, config.steps)
