"""Local-only training: personalisation on one device's data, no server.

The same training session as a federated client (cached base, seeded LoRA, the local
training loop; see ``fedtune.train.session``) with the settings of the federation's
scenario when the client names one, else the bundled default's, and the held-out loss
of the device's own texts before and after.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.config import ModelSpec, Scenario, load_scenario
from fedtune.data import PackedData
from fedtune.data.chat import pack_records
from fedtune.data.partition import split_train_eval
from fedtune.data.records import Record
from fedtune.data.types import DataError

if TYPE_CHECKING:
    from fedtune.train.session import Trainee

#: ``(steps done, steps, loss)`` after every optimizer step
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class LocalResult:
    """A locally trained adapter (a peft folder) and what training did to the held-out
    loss of this device's own texts."""

    adapter: Path
    train_loss: float
    eval_loss_before: float
    eval_loss_after: float
    steps: int


def _trainee(scenario: Scenario, source: str, lent: bool, steps: int | None,
             lr: float | None, rank: int | None) -> Trainee:
    """The scenario's client with this device's overrides; a lent model is used as it
    is (no quantization)."""
    from fedtune.train.session import Trainee

    lora = scenario.lora
    if rank is not None:
        lora = dataclasses.replace(lora, rank=rank, alpha=lora.scale * rank)
    config = dataclasses.replace(scenario.train, steps=steps or scenario.train.steps,
                                 lr=lr or scenario.train.lr)
    spec = ModelSpec(source=source, quantization="none" if lent else scenario.model.quantization,
                     device=scenario.model.device)
    return Trainee(spec, lora, config, scenario.run.seed)


def _own_blocks(texts: list[Record], name: str, tokenizer: Any, scenario: Scenario
                ) -> tuple[PackedData, PackedData]:
    """This device's records split (one part held out, seeded by its name) and packed as
    the scenario's ``[data]`` says (chat template, assistant-only loss)."""
    seed, seq_len, data = scenario.run.seed, scenario.data.seq_len, scenario.data
    train, held = split_train_eval(texts, data.eval_fraction, f"{seed}:{name}")
    blocks = pack_records(train, tokenizer, seq_len, data.chat_template,
                          data.assistant_only_loss)
    if len(blocks) == 0:
        raise DataError(f"the texts give no full training sequence of {seq_len} tokens; "
                        "give more text")
    return blocks, pack_records(held, tokenizer, seq_len, data.chat_template,
                                data.assistant_only_loss, held_out=True)


def train_alone(texts: list[Record], name: str, out: Path, *, model: Any = None,
                tokenizer: Any = None, federation: Scenario | None = None,
                steps: int | None = None, lr: float | None = None, rank: int | None = None,
                on_step: StepCallback | None = None) -> LocalResult:
    """Train a fresh LoRA on ``texts`` (one part held out) and save it to ``out``.

    ``model``: None (the scenario's base), a source name, or a loaded model lent for the
    session and given back without adapters. The caller serialises sessions that share
    a process's cached base (``fedtune.sdk.client`` holds its lock around this call).
    """
    from fedtune.model.cache import give_back
    from fedtune.model.loading import register_model

    scenario = federation or load_scenario(None)
    lent = model is not None and not isinstance(model, str)
    source = register_model(model, tokenizer) if lent else model or scenario.model.source
    try:
        trainee = _trainee(scenario, source, lent, steps, lr, rank)
        base_name = str(getattr(model.config, "_name_or_path", "")) if lent else None
        return _train_and_save(trainee, scenario, texts, name, out, base_name, on_step)
    finally:
        if lent:
            give_back(source)


def _train_and_save(trainee: Trainee, scenario: Scenario, texts: list[Record], name: str,
                    out: Path, base_name: str | None, on_step: StepCallback | None
                    ) -> LocalResult:
    from fedtune.model.loading import base_model_name
    from fedtune.model.lora import adapter_state, save_peft_adapter
    from fedtune.train import evaluate
    from fedtune.train.session import TrainingSession

    session = TrainingSession(trainee, seed=scenario.run.seed)
    model = session.prepare()
    blocks, held_out = _own_blocks(texts, name, session.tokenizer, scenario)

    def held_out_loss() -> float:
        return float(evaluate(model, held_out.input_ids, trainee.train.batch_size,
                              labels=held_out.labels, position_ids=held_out.position_ids).loss)

    def step(done: int, loss: float) -> None:
        if on_step is not None:
            on_step(done, trainee.train.steps, loss)

    before = held_out_loss()
    result = session.train(blocks, step)
    after = held_out_loss()
    save_peft_adapter(out, adapter_state(model), trainee.lora,
                      base_name if base_name is not None else base_model_name(trainee.model))
    return LocalResult(out, float(result.loss), before, after, trainee.train.steps)
