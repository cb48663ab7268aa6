"""Memory estimator: config-only dimensions, estimates checked against real models, plan()."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.model import LoraSpec, ModelNotFoundError, ModelSpec, attach_lora, load_base_model
from fedtune.model.memory import (
    LORA_TARGETS,
    MB,
    MemoryBudgetError,
    ModelDims,
    activation_bytes,
    candidate_ranks,
    dims_from_config,
    estimate,
    model_dims,
    plan,
)
from fedtune.model.tiny import build_tiny_model

QV = ("q_proj", "v_proj")
TOLERANCE = 0.15

# Measured on a 2-core CPU (ASSETS.md), SmolLM2-135M, LoRA r=8 on q/v, batch 4 x 128.
SMOLLM2_FOOTPRINT_MB = {"none": 513, "8bit": 209, "4bit": 158}
# Peak RSS (ru_maxrss) over load + one AdamW training step, same setting, measured for
# the estimator's calibration (see fedtune/model/memory.py).
SMOLLM2_PEAK_RSS_MB = {"none": 2178, "8bit": 2570, "4bit": 2427}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny() -> ModelDims:
    return model_dims("tiny")


@pytest.fixture(scope="module")
def smollm2() -> ModelDims:
    """Config only: the converted cache's config.json or the GGUF header, never a conversion."""
    try:
        return model_dims("smollm2")
    except ModelNotFoundError as err:
        pytest.skip(f"bundled model unavailable: {err}")


def _rel(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


# --------------------------------------------------------------------------- dims


def test_tiny_dims_count_every_parameter(tiny: ModelDims) -> None:
    model, _ = build_tiny_model()
    assert tiny.total_params == sum(p.numel() for p in model.parameters())
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads) == (64, 2, 4, 2)
    assert tiny.modules["k_proj"] == (64, 32) and tiny.modules["down_proj"] == (128, 64)
    assert set(tiny.modules) == set(LORA_TARGETS)
    # read without transformers (fedtune.model.sources), equal to the real config's
    assert tiny == dims_from_config(model.config.to_dict())


def test_smollm2_dims(smollm2: ModelDims) -> None:
    assert smollm2.num_layers == 30 and smollm2.hidden_size == 576
    assert smollm2.vocab_size == 49_152 and smollm2.tie_word_embeddings
    assert round(smollm2.total_params / 1e6, 1) == 134.5  # ASSETS.md


def test_dims_from_a_local_folder(tmp_path) -> None:
    config = {
        "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 8,
        "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 1000,
        "tie_word_embeddings": True,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    dims = model_dims(str(tmp_path))
    assert dims.head_dim == 16 and dims.modules["v_proj"] == (128, 32)
    assert dims.lm_head_params == 0


def test_dims_errors_name_what_is_missing(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        model_dims(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        model_dims(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        model_dims(str(tmp_path / "nope"))


def test_gguf_header_gives_the_same_dims(smollm2: ModelDims) -> None:
    from fedtune.model.loading import bundled_gguf_path
    from fedtune.model.memory import dims_from_gguf

    try:
        path = bundled_gguf_path()
    except ModelNotFoundError as err:
        pytest.skip(str(err))
    assert dims_from_gguf(path) == smollm2


# --------------------------------------------------------------------------- estimate


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_base_weights_match_tiny_footprint(tiny: ModelDims, quantization: str) -> None:
    model, _ = load_base_model(ModelSpec(source="tiny", quantization=quantization, device="cpu"))
    measured = model.get_memory_footprint() / MB
    predicted = estimate(tiny, quantization, 8, QV, 1, 16, "cpu").base_weights_mb
    assert _rel(predicted, measured) < TOLERANCE, (predicted, measured)


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_base_weights_match_smollm2_measurements(smollm2: ModelDims, quantization: str) -> None:
    predicted = estimate(smollm2, quantization, 8, QV, 4, 128, "cpu").base_weights_mb
    assert _rel(predicted, SMOLLM2_FOOTPRINT_MB[quantization]) < TOLERANCE


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_cpu_total_matches_smollm2_peak_rss(smollm2: ModelDims, quantization: str) -> None:
    total = estimate(smollm2, quantization, 8, QV, 4, 128, "cpu").total_mb
    assert _rel(total, SMOLLM2_PEAK_RSS_MB[quantization]) < TOLERANCE


def test_smollm2_lora_parameters(smollm2: ModelDims) -> None:
    est = estimate(smollm2, "none", 8, QV, 4, 128, "cpu")
    assert est.lora_mb * MB == 460_800 * 16  # ASSETS.md: 460,800 trainable; x4 fp32 copies


def test_activations_match_saved_tensors(tiny: ModelDims) -> None:
    """Count what autograd really saves for backward in one LoRA forward pass."""
    base, _ = load_base_model(ModelSpec(source="tiny", device="cpu"))
    model = attach_lora(base, LoraSpec(rank=8, target_modules=QV), seed=0).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, tiny.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    predicted, _ = activation_bytes(tiny, 8, QV, 4, 64)
    assert _rel(predicted, sum(saved.values())) < TOLERANCE


def test_estimate_terms_behave(smollm2: ModelDims) -> None:
    small = estimate(smollm2, "4bit", 8, QV, 4, 128, "cuda")
    assert small.load_staging_mb == 0 and small.quant_state_mb > 0
    assert estimate(smollm2, "4bit", 8, QV, 4, 128, "cpu").load_staging_mb > 500
    assert estimate(smollm2, "4bit", 16, QV, 4, 128, "cuda").lora_mb == 2 * small.lora_mb
    assert estimate(smollm2, "4bit", 8, QV, 8, 128, "cuda").activations_mb == pytest.approx(
        2 * small.activations_mb
    )
    assert small.total_mb == pytest.approx(sum(small.breakdown().values()))
    assert "4bit, rank 8" in small.describe()


def test_estimate_rejects_bad_arguments(tiny: ModelDims) -> None:
    with pytest.raises(ValueError, match="quantization = '3bit'.*none, 8bit, 4bit"):
        estimate(tiny, "3bit", 8, QV, 1, 8, "cpu")
    with pytest.raises(ValueError, match="device = 'tpu'"):
        estimate(tiny, "none", 8, QV, 1, 8, "tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown \\['qkv'\\].*allowed"):
        estimate(tiny, "none", 8, ["qkv"], 1, 8, "cpu")
    with pytest.raises(ValueError, match="batch_size = 0"):
        estimate(tiny, "none", 8, QV, 0, 8, "cpu")


# --------------------------------------------------------------------------- plan


def test_larger_budgets_get_larger_ranks(smollm2: ModelDims) -> None:
    needs = {r: estimate(smollm2, "4bit", r, QV, 4, 128, "cuda").total_mb for r in (1, 4, 16, 64)}
    for rank, need in needs.items():  # just enough for `rank`, not enough for twice that
        assert plan(smollm2, need + 0.5, QV, 4, 128, "cuda", quantization="4bit").rank == rank
    budgets = [1000 + 250 * i for i in range(12)]
    ranks = [_rank_or_zero(smollm2, b) for b in budgets]
    assert ranks == sorted(ranks) and ranks[0] == 0 and ranks[-1] == 64, ranks


def _rank_or_zero(dims: ModelDims, budget: float) -> int:
    try:
        return plan(dims, budget, QV, 4, 128, "cuda", quantization="4bit").rank
    except MemoryBudgetError:
        return 0


def test_plan_prefers_no_quantization_when_it_fits(smollm2: ModelDims) -> None:
    roomy = plan(smollm2, 8000, QV, 4, 128, "cuda")
    assert (roomy.quantization, roomy.rank) == ("none", 64)
    assert roomy.headroom_mb == pytest.approx(8000 - roomy.estimate.total_mb)
    none_needs = estimate(smollm2, "none", 1, QV, 4, 128, "cuda").total_mb
    tight = plan(smollm2, none_needs - 1, QV, 4, 128, "cuda")
    assert tight.quantization in ("8bit", "4bit") and tight.estimate.total_mb <= none_needs - 1


def test_plan_respects_fixed_settings(tiny: ModelDims) -> None:
    fixed = plan(tiny, 10_000, QV, 1, 32, "cpu", quantization="8bit", rank=4)
    assert (fixed.quantization, fixed.rank) == ("8bit", 4)


def test_plan_errors_clearly_when_nothing_fits(smollm2: ModelDims) -> None:
    with pytest.raises(MemoryBudgetError, match="budget of 300 MB") as info:
        plan(smollm2, 300, QV, 4, 128, "cuda")
    err = info.value
    assert isinstance(err, ValueError) and err.budget_mb == 300
    assert err.smallest.rank == 1 and err.smallest.quantization == "4bit"
    assert f"needs {err.smallest.total_mb:,.0f} MB" in str(err)


def test_plan_error_names_the_leanest_config_on_cpu(smollm2: ModelDims) -> None:
    """On CPU an unquantized base is leaner than bitsandbytes, and the error says so."""
    with pytest.raises(MemoryBudgetError) as info:
        plan(smollm2, 500, QV, 4, 128, "cpu")
    assert info.value.smallest.quantization == "none"


def test_rank_never_exceeds_the_target_width(tiny: ModelDims) -> None:
    assert candidate_ranks(tiny, QV, 64) == [32, 16, 8, 4, 2, 1]  # v_proj is 64 -> 32
    assert plan(tiny, 100_000, QV, 1, 16, "cpu").rank == 32
    with pytest.raises(ValueError, match="rank = 64.*min\\(in, out\\) = 32"):
        plan(tiny, 100_000, QV, 1, 16, "cpu", rank=64)


def test_plan_rejects_bad_arguments(tiny: ModelDims) -> None:
    with pytest.raises(ValueError, match="budget_mb = -1"):
        plan(tiny, -1, QV, 1, 16, "cpu")
    with pytest.raises(ValueError, match="quantization = 'fp8'.*auto"):
        plan(tiny, 1000, QV, 1, 16, "cpu", quantization="fp8")
    with pytest.raises(ValueError, match="rank = 'big'"):
        plan(tiny, 1000, QV, 1, 16, "cpu", rank="big")  # type: ignore[arg-type]
