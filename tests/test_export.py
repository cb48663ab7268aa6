"""Export by the Hub's conventions (fedtune.model.lora.save_global_factors, the run
directory's adapter/): the configured lora_alpha and the factors as trained, so plain
peft continues training exactly where fedtune would; the tokenizer and a model card
beside it."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from fedtune.config import LoraSpec, ModelSpec, load_scenario
from fedtune.core.adapters import LoraFactors
from fedtune.core.codec import scale_folded_state_dict, state_dict_from_factors
from fedtune.flower.inprocess_grid import simulate_in_process
from fedtune.flower.server_app import restore
from fedtune.flower.strategy import FedtuneStrategy
from fedtune.model.loading import load_base_model
from fedtune.model.lora import (
    ADAPTER_WEIGHTS,
    adapter_state,
    exported_update,
    save_global_factors,
)
from fedtune.model.sources import BUNDLED_GGUF
from fedtune.planning.client_settings import client_settings
from fedtune.runs.model_card import MODEL_CARD, base_description, model_card
from fedtune.runs.rundir import ADAPTER_DIR
from fedtune.train.local import batch_indices
from fedtune.train.session import Trainee, TrainingSession

ALPHA, RANK = 12.0, 4  # scale 3: a folded export (alpha = r) would differ from it
NEXT_SEED = 11


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One round of the tiny federation with lora_alpha != r, one local step a client
    (the real ClientApp and ServerApp on the in-process grid: no Ray to start)."""
    scenario = load_scenario("tiny", [f"lora.alpha={ALPHA}", f"lora.rank={RANK}",
                                      "run.rounds=1", "data.num_clients=2",
                                      "train.steps=1", "train.batch_size=4"])
    return scenario, simulate_in_process(scenario, out_dir=tmp_path_factory.mktemp("runs"))


def _blocks(scenario, rows: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (rows, scenario.data.seq_len), generator=gen)


def _plain_peft_step(scenario, adapter, blocks: torch.Tensor, seed: int) -> PeftModel:
    """One optimizer step as a peft user writes it, with fedtune's optimizer settings:
    AdamW(lr, weight_decay), grad-norm clipping, the rows fedtune's seeded sampler
    draws first; constant lr, no warmup, one micro-batch (asserted)."""
    cfg = scenario.train
    assert (cfg.schedule, cfg.warmup_steps, cfg.grad_accum) == ("constant", 0, 1)
    base, _ = load_base_model(ModelSpec(source=scenario.model.source, device="cpu"))
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rows = next(batch_indices(blocks.shape[0], cfg.batch_size,
                              torch.Generator().manual_seed(seed)))
    model.train()
    model(input_ids=blocks[rows], labels=blocks[rows]).loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    return model


def test_export_keeps_configured_alpha_and_tokenizer_and_card(tiny_run):
    scenario, run_dir = tiny_run
    adapter = run_dir / ADAPTER_DIR
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert (adapter / "tokenizer_config.json").is_file()
    card = (adapter / MODEL_CARD).read_text()
    assert "library_name: peft" in card and "aggregator `fedavg`" in card
    assert f"lora_alpha = {ALPHA:g}" in card and "Rounds: 1 of 1; clients: 2" in card
    assert "Differential privacy: none" in card and "fedtune simulate -s" in card
    toml = card.split("```toml\n", 1)[1].split("```", 1)[0]
    (run_dir / "from-card.toml").write_text(toml)
    assert load_scenario(str(run_dir / "from-card.toml")).to_dict() == scenario.to_dict()


def test_exported_adapter_is_what_the_server_sends_next(tiny_run):
    """The factors as trained: the tensors equal the next round's train payload."""
    scenario, run_dir = tiny_run
    strategy = FedtuneStrategy(scenario)
    restore(strategy, scenario, run_dir)
    payload = state_dict_from_factors(strategy._train_payload(client_settings(scenario)[0]))
    exported = load_file(str(run_dir / ADAPTER_DIR / ADAPTER_WEIGHTS))
    assert exported.keys() == payload.keys()
    assert all(torch.equal(exported[k], payload[k]) for k in payload)


def test_plain_peft_next_step_equals_fedtunes(tiny_run):
    scenario, run_dir = tiny_run
    strategy = FedtuneStrategy(scenario)
    restore(strategy, scenario, run_dir)
    settings = client_settings(scenario)[0]
    payload = state_dict_from_factors(strategy._train_payload(settings))
    blocks = _blocks(scenario)

    session = TrainingSession(Trainee.of(scenario, settings), NEXT_SEED, payload=payload)
    session.prepare()
    session.train(blocks)
    theirs = adapter_state(session.model)

    peft_model = _plain_peft_step(scenario, run_dir / ADAPTER_DIR, blocks, NEXT_SEED)
    ours = get_peft_model_state_dict(peft_model)
    assert ours.keys() == theirs.keys()
    moved = 0.0
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0.0, atol=1e-6)
        moved = max(moved, float((theirs[key] - payload[key]).abs().max()))
    assert moved > 1e-4  # the step did change the adapter: the comparison is not vacuous


def test_recompressed_and_mixed_ranks_keep_the_update(tmp_path):
    """Scale-1 factors (flexlora, flora's stack) and modules of another rank: stored at
    the configured scale (B absorbs the ratio), lora_alpha as configured, update exact."""
    spec = LoraSpec(rank=4, alpha=12.0)
    gen = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.self_attn."
    factors = {prefix + "q_proj": LoraFactors(torch.randn(4, 64, generator=gen),
                                              torch.randn(64, 4, generator=gen), scale=1.0),
               prefix + "v_proj": LoraFactors(torch.randn(8, 64, generator=gen),
                                              torch.randn(32, 8, generator=gen), scale=3.0)}
    out = save_global_factors(tmp_path / "a", factors, spec, "tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 12.0)
    assert config["rank_pattern"] == {"model.layers.0.self_attn.v_proj": 8}
    assert config["alpha_pattern"] == {"model.layers.0.self_attn.v_proj": 24.0}
    saved = load_file(str(out / ADAPTER_WEIGHTS))
    assert torch.equal(saved[prefix + "v_proj.lora_B.weight"], factors[prefix + "v_proj"].B)

    base, _ = load_base_model(ModelSpec(source="tiny", device="cpu"))
    model = PeftModel.from_pretrained(base, str(out))
    modules = dict(model.named_modules())
    for name, f in factors.items():
        module = modules[name]
        delta = module.scaling["default"] * (module.lora_B["default"].weight
                                             @ module.lora_A["default"].weight)
        torch.testing.assert_close(delta, f.delta(), rtol=1e-5, atol=1e-6)
    folded, expected = exported_update(out), scale_folded_state_dict(factors)
    for key in expected:
        torch.testing.assert_close(folded[key], expected[key], rtol=1e-6, atol=1e-7)


def test_card_names_the_bundled_base_exactly():
    text = base_description("smollm2", "4bit", "float32")
    assert "Q4_1" in text and BUNDLED_GGUF in text and "dequantized" in text
    assert "4bit (bitsandbytes" in text


def test_card_states_epsilon_under_dp():
    scenario = load_scenario("tiny")
    card = model_card(scenario, 3, {"mode": "central", "epsilon": 2.5, "delta": 1e-5,
                                    "accountant": "rdp"})
    assert "mode `central`, epsilon = 2.5, delta = 1e-05" in card
    assert "Rounds: 3 of 3" in card and "fedtune's tiny random test model" in card


def test_a_tokenizer_the_server_cannot_load_does_not_stop_the_export(tmp_path, caplog):
    from fedtune.flower.server_app import _save_tokenizer

    _save_tokenizer(str(tmp_path / "only-on-the-clients"), tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert "has no tokenizer" in caplog.text and "only-on-the-clients" in caplog.text
