"""Device profiles: bundled TOMLs load and resolve, bad input is explained, assignment."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import pytest

from fedtune.model import ModelNotFoundError
from fedtune.model.memory import LORA_TARGETS, MemoryBudgetError, ModelDims, model_dims
from fedtune.planning.profiles import (
    DeviceProfile,
    ProfileError,
    assign_profiles,
    bundled_profiles,
    load_profile,
    mix_counts,
    resolve_profile,
)

QV = ("q_proj", "v_proj")
TARGET_SETS = [QV, LORA_TARGETS]
BUNDLED = bundled_profiles()
GOOD = {"name": "my-board", "memory_budget_mb": 4096, "device": "cuda"}


@pytest.fixture(scope="module")
def tiny() -> ModelDims:
    return model_dims("tiny")


@pytest.fixture(scope="module")
def smollm2() -> ModelDims:
    try:
        return model_dims("smollm2")  # config only; never converts the GGUF
    except ModelNotFoundError as err:
        pytest.skip(f"bundled model unavailable: {err}")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "custom.toml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- bundled


def test_at_least_four_bundled_profiles() -> None:
    assert len(BUNDLED) >= 4
    assert {"jetson-orin-nano-8gb", "laptop-rtx4060-8gb", "cpu-box-16gb"} <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_loads(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name  # the file name is the profile's name
    assert profile.hardware and profile.description


@pytest.mark.parametrize("targets", TARGET_SETS, ids=["qv", "all"])
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_resolves_on_tiny(tiny: ModelDims, name: str, targets) -> None:
    profile = load_profile(name)
    resolved = resolve_profile(profile, tiny, targets)
    _check_resolved(profile, resolved, tiny, targets)


@pytest.mark.parametrize("targets", TARGET_SETS, ids=["qv", "all"])
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_resolves_on_smollm2(smollm2: ModelDims, name: str, targets) -> None:
    profile = load_profile(name)
    resolved = resolve_profile(profile, smollm2, targets)
    _check_resolved(profile, resolved, smollm2, targets)


def _check_resolved(profile: DeviceProfile, resolved, dims: ModelDims, targets) -> None:
    assert resolved.fits and resolved.estimate.total_mb <= profile.memory_budget_mb
    assert 1 <= resolved.rank <= min(64, dims.max_rank(targets))
    assert resolved.alpha == profile.alpha_ratio * resolved.rank
    if profile.quantization != "auto":
        assert resolved.quantization == profile.quantization
    if profile.rank != "auto":
        assert resolved.rank == min(profile.rank, dims.max_rank(targets))
    spec = resolved.lora_spec()
    assert spec.scale == profile.alpha_ratio and spec.target_modules == tuple(targets)


def test_smollm2_resolutions(smollm2: ModelDims) -> None:
    """The planner's picks for the bundled model on q/v (documented in clients/README.md)."""
    picks = {n: resolve_profile(load_profile(n), smollm2, QV) for n in BUNDLED}
    chosen = {n: (r.quantization, r.rank) for n, r in picks.items()}
    assert chosen["jetson-orin-nano-8gb"] == ("4bit", 64)
    assert chosen["laptop-rtx4060-8gb"] == ("8bit", 16)
    assert chosen["workstation-rtx4090-24gb"] == ("none", 64)
    assert chosen["phone-class-4gb"][0] == "none"  # leanest on CPU, see memory.py


def test_load_from_path_and_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, 'name = "my-board"\nmemory_budget_mb = 4096\ndevice = "cuda"\n')
    profile = load_profile(path)
    assert (profile.quantization, profile.rank, profile.alpha_ratio) == ("auto", "auto", 2.0)
    assert load_profile(str(path)) == profile


# --------------------------------------------------------------------------- errors


def test_unknown_name_lists_bundled() -> None:
    with pytest.raises(ProfileError, match="unknown device profile 'toaster'") as info:
        load_profile("toaster")
    assert all(name in str(info.value) for name in BUNDLED)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(_write(tmp_path, "name = "))


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, 'name = "x"\nmemory_budget_mb = 1\ndevice = "cpu"\nbatchsize = 2\n')
    with pytest.raises(ProfileError, match="unknown key 'batchsize'.*'batch_size'.*allowed keys"):
        load_profile(path)


def test_missing_required_key() -> None:
    with pytest.raises(ProfileError, match="missing required key\\(s\\) memory_budget_mb"):
        DeviceProfile.from_dict({"name": "x", "device": "cpu"})


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("device", "tpu", "cpu \\| cuda"),
        ("quantization", "2bit", "none \\| 8bit \\| 4bit \\| auto"),
        ("rank", 0, "integer >= 1 or 'auto'"),
        ("rank", "big", "integer >= 1 or 'auto'"),
        ("rank", True, "integer >= 1 or 'auto'"),
        ("batch_size", 1.5, "integer >= 1"),
        ("seq_len", -8, "integer >= 1"),
        ("memory_budget_mb", -1, "number > 0"),
        ("speed_factor", 0, "number > 0"),
        ("alpha_ratio", "two", "number > 0"),
        ("name", "My Board", "lower-case"),
    ],
)
def test_bad_values_name_key_value_and_allowed(key: str, value, allowed: str) -> None:
    expected = f"test.toml: {key} = {re.escape(repr(value))} is not allowed; expected .*{allowed}"
    with pytest.raises(ProfileError, match=expected):
        DeviceProfile.from_dict(GOOD | {key: value}, origin="test.toml")


def test_direct_construction_is_validated_too() -> None:
    profile = DeviceProfile(**GOOD)
    with pytest.raises(ProfileError, match="device = 'gpu'"):
        dataclasses.replace(profile, device="gpu")


# --------------------------------------------------------------------------- resolve


def test_fixed_settings_that_do_not_fit_raise(smollm2: ModelDims) -> None:
    profile = DeviceProfile(**GOOD | {"memory_budget_mb": 500, "quantization": "none", "rank": 8})
    with pytest.raises(MemoryBudgetError, match="profile 'my-board'.*budget of 500 MB"):
        resolve_profile(profile, smollm2, QV)


def test_non_strict_warns_and_returns_the_leanest(smollm2: ModelDims) -> None:
    profile = DeviceProfile(**GOOD | {"memory_budget_mb": 500})
    with pytest.warns(RuntimeWarning, match="my-board"):
        resolved = resolve_profile(profile, smollm2, QV, strict=False)
    assert not resolved.fits and (resolved.quantization, resolved.rank) == ("4bit", 1)


def test_auto_rank_respects_max_rank(tiny: ModelDims) -> None:
    profile = DeviceProfile(**GOOD | {"memory_budget_mb": 100_000})
    assert resolve_profile(profile, tiny, QV, max_rank=4).rank == 4


# --------------------------------------------------------------------------- assign


def test_list_is_cycled_over_client_ids() -> None:
    assert assign_profiles(5, ["a", "b"], seed=0) == ["a", "b", "a", "b", "a"]
    assert assign_profiles(2, ["a", "b", "c"], seed=9) == ["a", "b"]


def test_mix_gives_exact_counts() -> None:
    assert mix_counts(10, {"a": 0.25, "b": 0.75}) == {"a": 3, "b": 7}
    assert mix_counts(10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == {"a": 4, "b": 3, "c": 3}
    assert mix_counts(7, {"a": 0.5, "b": 0.5, "c": 0.0}) == {"a": 4, "b": 3, "c": 0}
    names = assign_profiles(100, {"a": 0.1, "b": 0.3, "c": 0.6}, seed=1)
    assert Counter(names) == {"a": 10, "b": 30, "c": 60}


def test_mix_is_seeded_and_shuffled() -> None:
    mix = {"a": 0.5, "b": 0.5}
    first = assign_profiles(20, mix, seed=3)
    assert first == assign_profiles(20, mix, seed=3)
    assert any(assign_profiles(20, mix, seed=s) != first for s in range(4, 10))
    assert first != sorted(first)  # not left in blocks


@pytest.mark.parametrize(
    ("mix", "match"),
    [
        ({"a": 0.5, "b": 0.4}, "sum to 0.9, not 1"),
        ({"a": 1.5, "b": -0.5}, "mix\\['b'\\] = -0.5"),
        ({}, "empty"),
        ({"a": "half", "b": 0.5}, "mix\\['a'\\] = 'half'"),
    ],
)
def test_bad_proportions(mix: dict, match: str) -> None:
    with pytest.raises(ProfileError, match=match):
        assign_profiles(10, mix, seed=0)


def test_bad_assign_arguments() -> None:
    with pytest.raises(ProfileError, match="num_clients = 0"):
        assign_profiles(0, ["a"], seed=0)
    with pytest.raises(ProfileError, match="non-empty list"):
        assign_profiles(3, [], seed=0)
    with pytest.raises(ProfileError, match="non-empty list"):
        assign_profiles(3, "a", seed=0)  # type: ignore[arg-type]
