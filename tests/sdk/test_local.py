"""``Client.train_local``: personalisation without a server runs the federated client's
training session on the device's own texts, reports progress, and saves a peft adapter."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import fedtune
from fedtune.config import load_scenario
from fedtune.model.lora import adapter_state
from fedtune.sdk.local import _own_blocks, _trainee
from fedtune.train.session import TrainingSession

TEXTS = [f"Note {i}: call the plumber, water the fig tree, and plan the beta release {i}."
         for i in range(40)]


def test_train_local_is_the_training_session_on_the_devices_texts(tmp_path: Path) -> None:
    scenario = load_scenario("tiny", ["train.steps=3"])
    client = fedtune.Client(TEXTS, federation=scenario, name="notes",
                            state_dir=tmp_path / "state")
    seen = []
    result = client.train_local(steps=2, on_progress=seen.append)
    assert [(p.kind, p.step, p.steps) for p in seen] == [("step", 1, 2), ("step", 2, 2)]
    assert result.steps == 2 and result.adapter == tmp_path / "state" / "local-adapter"
    saved = load_file(str(result.adapter / "adapter_model.safetensors"))

    trainee = _trainee(scenario, scenario.model.source, False, 2, None, None)
    session = TrainingSession(trainee, seed=scenario.run.seed)
    session.prepare()
    blocks, _ = _own_blocks(TEXTS, "notes", session.tokenizer, scenario)
    assert session.train(blocks).loss == result.train_loss
    trained = adapter_state(session.model)
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
