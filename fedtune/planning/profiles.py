"""Device profiles: what a client's hardware allows (memory, quantization, rank, speed).

Federated fine-tuning is heterogeneous by nature; a profile describes one class of real
device (``clients/profiles/*.toml``, shipped in the package: ``fedtune.resources``) so
a simulation can mix them and a real client can say what it can afford.
``resolve_profile`` turns a profile into concrete settings for a given model using the
memory planner; ``assign_profiles`` spreads profiles over clients.
"""

from __future__ import annotations

import difflib
import math
import random
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

import fedtune.resources as resources
from fedtune.config import LoraSpec
from fedtune.model.memory import (
    DEVICES,
    QUANTIZATIONS,
    MemoryBudgetError,
    MemoryEstimate,
    ModelDims,
    plan,
)
from fedtune.privacy.floor import PrivacyFloor

AUTO = "auto"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PROPORTION_TOLERANCE = 1e-6


class ProfileError(ValueError):
    """A profile is missing, malformed, or names a bad key/value; the message says which."""


# --------------------------------------------------------------------------- the profile


@dataclass(frozen=True)
class DeviceProfile:
    """One class of client device, validated on construction."""

    name: str
    memory_budget_mb: float
    device: str
    hardware: str = ""
    description: str = ""
    quantization: str = AUTO
    rank: int | str = AUTO
    alpha_ratio: float = 2.0
    batch_size: int = 4
    seq_len: int = 128
    speed_factor: float = 1.0
    #: the device owner's privacy floor (``fedtune.privacy.floor``): the client refuses
    #: to train under weaker client-level DP; 0 = no bound
    min_noise_multiplier: float = 0.0
    max_clip_norm: float = 0.0
    max_epsilon: float = 0.0

    def __post_init__(self) -> None:
        for key, (ok, allowed) in _RULES.items():
            value = getattr(self, key)
            if not ok(value):
                raise ProfileError(f"{key} = {value!r} is not allowed; expected {allowed}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "profile") -> DeviceProfile:
        """Build from parsed TOML; unknown or missing keys fail with the allowed ones listed."""
        allowed = [f.name for f in fields(cls)]
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ProfileError(
                    f"{origin}: unknown key {key!r}{maybe}; allowed keys: {', '.join(allowed)}"
                )
        missing = [f.name for f in fields(cls) if f.name not in data and _required(f)]
        if missing:
            raise ProfileError(f"{origin}: missing required key(s) {', '.join(missing)}")
        try:
            return cls(**data)
        except ProfileError as err:
            raise ProfileError(f"{origin}: {err}") from None

    @property
    def privacy_floor(self) -> PrivacyFloor:
        return PrivacyFloor(self.min_noise_multiplier, self.max_clip_norm, self.max_epsilon)


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_positive(value: object) -> bool:
    return _is_number(value) and value > 0  # type: ignore[operator]


def _is_non_negative(value: object) -> bool:
    return _is_number(value) and value >= 0  # type: ignore[operator]


def _is_text(value: object) -> bool:
    return isinstance(value, str)


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: _is_text(v) and bool(_NAME.match(v)), "lower-case letters, digits, . _ -"),
    "memory_budget_mb": (_is_positive, "a number > 0 (MiB)"),
    "device": (lambda v: v in DEVICES, " | ".join(DEVICES)),
    "hardware": (_is_text, "a string"),
    "description": (_is_text, "a string"),
    "quantization": (lambda v: v in (*QUANTIZATIONS, AUTO), " | ".join((*QUANTIZATIONS, AUTO))),
    "rank": (lambda v: v == AUTO or _is_count(v), "an integer >= 1 or 'auto'"),
    "alpha_ratio": (_is_positive, "a number > 0 (alpha = alpha_ratio x rank)"),
    "batch_size": (_is_count, "an integer >= 1"),
    "seq_len": (_is_count, "an integer >= 1"),
    "speed_factor": (_is_positive, "a number > 0 (1.0 = reference device)"),
    "min_noise_multiplier": (_is_non_negative, "a number >= 0 (0 = no floor)"),
    "max_clip_norm": (_is_non_negative, "a number >= 0 (0 = no bound)"),
    "max_epsilon": (_is_non_negative, "a number >= 0 (0 = no bound)"),
}


# --------------------------------------------------------------------------- loading


def bundled_profiles() -> list[str]:
    """Names of the profiles shipped with fedtune (``clients/profiles/`` in the repository)."""
    return resources.names("profile")


def profile_path(name_or_path: str | Path) -> Path:
    """A profile file by path, or a bundled profile by name; ``ProfileError`` names what
    is missing (with the bundled names: none listed means a broken installation)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if isinstance(name_or_path, Path) or "/" in text or text.endswith(".toml"):
        if path.is_file():
            return path
        bundled = resources.from_repository_path(text)  # clients/profiles/NAME.toml
        if bundled is not None:
            return bundled
        raise ProfileError(f"profile file {text!r} does not exist ({path.resolve()})")
    if text not in bundled_profiles():
        raise ProfileError(
            f"unknown device profile {text!r}; bundled profiles: "
            f"{', '.join(bundled_profiles()) or '(none)'} (or pass a path to a .toml file)"
        )
    return resources.path("profile", text)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A bundled profile by name (``jetson-orin-nano-8gb``) or a profile TOML file by path."""
    path = profile_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"{path}: not valid TOML: {err}") from None
    return DeviceProfile.from_dict(data, origin=str(path))


# --------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class ResolvedProfile:
    """Concrete client settings for one model, with the memory estimate behind them."""

    name: str
    quantization: str
    rank: int
    alpha: float
    batch_size: int
    seq_len: int
    device: str
    estimate: MemoryEstimate
    target_modules: tuple[str, ...]
    memory_budget_mb: float
    speed_factor: float
    fits: bool = True

    def lora_spec(self, dropout: float = 0.05) -> LoraSpec:
        return LoraSpec(
            rank=self.rank, alpha=self.alpha, dropout=dropout, target_modules=self.target_modules
        )


def resolve_profile(
    profile: DeviceProfile,
    dims: ModelDims,
    target_modules: Iterable[str],
    max_rank: int = 64,
    strict: bool = True,
) -> ResolvedProfile:
    """Fill in ``auto`` rank/quantization with ``plan()`` and check the result fits.

    A profile whose settings cannot fit its budget raises ``MemoryBudgetError`` (a
    simulated device that could not really train would give misleading results). With
    ``strict=False`` it warns instead and returns the leanest configuration tried, marked
    ``fits=False``. Profiles are model-agnostic, so a fixed rank above min(in, out) of
    the targets (rank 64 on a 32-wide tiny model) is capped there.
    """
    targets = tuple(target_modules)
    rank = profile.rank
    if rank != AUTO:
        rank = min(int(rank), dims.max_rank(targets))
    try:
        chosen = plan(
            dims,
            profile.memory_budget_mb,
            targets,
            profile.batch_size,
            profile.seq_len,
            device=profile.device,
            quantization=profile.quantization,
            rank=rank,
            max_rank=max_rank,
        )
        estimate, fits = chosen.estimate, True
    except MemoryBudgetError as err:
        message = f"device profile {profile.name!r}: {err}"
        if strict:
            raise MemoryBudgetError(message, err.budget_mb, err.smallest) from None
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        estimate, fits = err.smallest, False
    return ResolvedProfile(
        name=profile.name,
        quantization=estimate.quantization,
        rank=estimate.rank,
        alpha=profile.alpha_ratio * estimate.rank,
        batch_size=profile.batch_size,
        seq_len=profile.seq_len,
        device=profile.device,
        estimate=estimate,
        target_modules=targets,
        memory_budget_mb=float(profile.memory_budget_mb),
        speed_factor=float(profile.speed_factor),
        fits=fits,
    )


# --------------------------------------------------------------------------- assigning


def assign_profiles(
    num_clients: int, profiles: list[str] | Mapping[str, float], seed: int
) -> list[str]:
    """Profile name per client id.

    A list is cycled (client i gets ``profiles[i % len]``, seed unused): predictable
    for small hand-made federations. A mapping is a mix ``{name: proportion}`` summing to
    1; it becomes exact counts by largest remainder (so 10 clients at 0.25/0.75 are 3/7
    or 2/8, never 2/7) and is shuffled with ``random.Random(seed)``.
    """
    if not _is_count(num_clients):
        raise ProfileError(
            f"num_clients = {num_clients!r} is not allowed; expected an integer >= 1"
        )
    if isinstance(profiles, Mapping):
        return _assign_mix(num_clients, profiles, seed)
    if isinstance(profiles, str) or not profiles:
        raise ProfileError(
            f"profiles = {profiles!r} is not allowed; expected a non-empty list of profile "
            "names or a {name: proportion} mapping"
        )
    names = list(profiles)
    return [names[i % len(names)] for i in range(num_clients)]


def _assign_mix(num_clients: int, mix: Mapping[str, float], seed: int) -> list[str]:
    counts = mix_counts(num_clients, mix)
    names = [name for name, count in counts.items() for _ in range(count)]
    random.Random(seed).shuffle(names)
    return names


def mix_counts(num_clients: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Exact client counts for a mix by the largest-remainder method (ties: mix order)."""
    _check_mix(mix)
    quotas = {name: share * num_clients for name, share in mix.items()}
    counts = {name: math.floor(q) for name, q in quotas.items()}
    short = num_clients - sum(counts.values())
    by_remainder = sorted(mix, key=lambda name: quotas[name] - counts[name], reverse=True)
    for name in by_remainder[:short]:
        counts[name] += 1
    return counts


def _check_mix(mix: Mapping[str, float]) -> None:
    if not mix:
        raise ProfileError("profile mix is empty; expected {name: proportion} summing to 1")
    for name, share in mix.items():
        if not _is_number(share) or share < 0:
            raise ProfileError(
                f"profile mix[{name!r}] = {share!r} is not allowed; expected a number >= 0"
            )
    total = math.fsum(mix.values())
    if abs(total - 1.0) > _PROPORTION_TOLERANCE:
        raise ProfileError(
            f"profile mix proportions sum to {total:.6g}, not 1 "
            f"(tolerance {_PROPORTION_TOLERANCE:g}): {dict(mix)}"
        )
