"""LoRA adapters on top of a frozen (optionally quantized) base, via peft.

Federated clients only ever exchange the adapter tensors, so this module owns the
round trip: seeded attach/reset, state extraction/loading with strict key checks, and
export to a folder that ``PeftModel.from_pretrained`` understands.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from fedtune.config import LoraSpec
from fedtune.core.adapters import LoraFactors
from fedtune.core.codec import (
    factors_from_state_dict,
    scale_folded_state_dict,
    state_dict_from_factors,
)
from fedtune.core.files import atomic_directory
from fedtune.core.init import seeded_latent_basis, seeded_lora_A
from fedtune.model.loading import base_model_name

__all__ = [
    "GLOBAL_ADAPTER",
    "LoraSpec",
    "activate",
    "adapter_name",
    "adapter_state",
    "attach_lora",
    "base_model_name",
    "ensure_adapter",
    "install_latent",
    "load_adapter_state",
    "load_frozen_global",
    "reset_lora",
    "exported_update",
    "save_folded_adapter",
    "save_global_factors",
    "save_peft_adapter",
    "training_adapter",
    "uninstall_latent",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_A_SUFFIX = ".lora_A.weight"
_LORA_B_SUFFIX = ".lora_B.weight"
_PEFT_PREFIX = "base_model.model."


def _lora_config(spec: LoraSpec, **overrides: object) -> LoraConfig:
    kwargs: dict[str, object] = {
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.target_modules),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    return LoraConfig(**(kwargs | overrides))


# --------------------------------------------------------------------------- attach / init


def _linear_leaf_names(model: nn.Module) -> list[str]:
    """Distinct last name components of Linear modules (bnb Linear4bit/8bitLt included)."""
    names = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    return sorted(names)


def _check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Fail with the available names instead of peft's bare 'not found'."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        available = ", ".join(_linear_leaf_names(model)[:12]) or "(none)"
        raise ValueError(
            f"LoRA target module(s) {missing} match no module in {type(model).__name__}; "
            f"linear modules that exist: {available}"
        )


def _is_kbit(model: nn.Module) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def _seeded_init(model: nn.Module, seed: int, only: str | None = None) -> None:
    """peft's default init (A ~ kaiming-uniform(a=sqrt 5), B = 0), from a CPU generator.

    Drawing on CPU makes A identical across processes and devices for the same seed; the
    tensors come from ``fedtune.core.init`` so the server can rebuild them.
    """
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, lora_a in module.lora_A.items():
            if only is not None and adapter != only:
                continue
            fresh = seeded_lora_A(seed, name, tuple(lora_a.weight.shape))
            with torch.no_grad():
                lora_a.weight.copy_(fresh)
                module.lora_B[adapter].weight.zero_()


def attach_lora(
    model: PreTrainedModel, spec: LoraSpec, seed: int, adapter: str = "default"
) -> PeftModel:
    """Wrap ``model`` with trainable LoRA on ``spec.target_modules``; the base stays frozen.

    Returned in eval mode (peft leaves a mix of modes); trainers call ``.train()``.
    """
    _check_targets(model, spec.target_modules)
    if _is_kbit(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft's own init must not shift the caller's RNG; and peft asks every model it
        # wraps transformers' deprecated ``is_gradient_checkpointing`` (nothing a user can do)
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        peft_model = get_peft_model(model, _lora_config(spec), adapter_name=adapter)
    _seeded_init(peft_model, seed, adapter)
    return peft_model.eval()


def reset_lora(model: PeftModel, seed: int) -> None:
    """Put the training adapter back to the state ``attach_lora(..., seed)`` would produce."""
    _seeded_init(model, seed, training_adapter(model))


# --------------------------------------------------------------------------- several adapters
# One base model serves clients of different ranks (one adapter per LoRA spec) and can
# carry a frozen full-precision "global" adapter under the trainable one (FLoRA-style
# residual training on a quantized base that is never modified).

GLOBAL_ADAPTER = "global"


def adapter_name(spec: LoraSpec) -> str:
    """Stable adapter name for a LoRA spec (keys in state dicts never include it)."""
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:8]
    return f"r{spec.rank}_{digest}"


def training_adapter(model: PeftModel) -> str:
    """The active adapter that trains (the first active one that is not the global one)."""
    for name in model.active_adapters:
        if name != GLOBAL_ADAPTER:
            return name
    raise ValueError("the model has no active trainable adapter")


def ensure_adapter(model: PeftModel, spec: LoraSpec, seed: int) -> str:
    """Add (seeded) an adapter for ``spec`` unless the model has one; return its name."""
    name = adapter_name(spec)
    if name not in model.peft_config:
        _check_targets(model, spec.target_modules)
        with torch.random.fork_rng(devices=[]):
            model.add_adapter(name, _lora_config(spec))
        _seeded_init(model, seed, name)
    return name


def activate(model: PeftModel, adapter: str, with_global: bool = False,
             freeze_A: bool = False) -> None:
    """Make ``adapter`` the trainable one; optionally stack the frozen global adapter under
    it, and optionally freeze its A factors (FFA-LoRA trains B only)."""
    names = [adapter, GLOBAL_ADAPTER] if with_global else [adapter]
    model.base_model.set_adapter(names)  # active adapters become trainable, others frozen
    for name, param in model.named_parameters():
        if with_global and f".{GLOBAL_ADAPTER}." in name:
            param.requires_grad_(False)
        elif freeze_A and f"lora_A.{adapter}." in name:
            param.requires_grad_(False)


def load_frozen_global(model: PeftModel, state: dict[str, Tensor], spec: LoraSpec) -> None:
    """Install ``state`` (scale 1: ``B @ A`` is the update) as the frozen global adapter.

    Modules may have different ranks (a recompressed module's rank is capped by its
    shape); they are zero-padded to the largest, which leaves every ``B @ A`` unchanged.
    """
    rank = max(_module_ranks(state).values())
    state = _pad_ranks(state, rank)
    config = model.peft_config.get(GLOBAL_ADAPTER)
    if config is not None and config.r != rank:
        model.delete_adapter(GLOBAL_ADAPTER)
        config = None
    if config is None:
        global_spec = LoraSpec(rank=rank, alpha=float(rank), dropout=0.0,
                               target_modules=spec.target_modules)
        with torch.random.fork_rng(devices=[]):
            model.add_adapter(GLOBAL_ADAPTER, _lora_config(global_spec))
    _load_into(model, state, GLOBAL_ADAPTER)


# --------------------------------------------------------------------------- Fed-SB


class LatentB(nn.Linear):
    """Fed-SB's lora_B while a client trains: B = B_start + B_0 R, and only R (r x r)
    is a trainable parameter. ``weight`` (frozen) holds B as of the last ``sync``, so the
    adapter's state dict stays an ordinary LoRA; B_start and B_0 are not saved."""

    def __init__(self, start: Tensor, basis: Tensor) -> None:
        out_features, rank = start.shape
        super().__init__(rank, out_features, bias=False, device=start.device,
                         dtype=start.dtype)
        self.weight.requires_grad_(False)
        self.register_buffer("start", start.detach().clone(), persistent=False)
        self.register_buffer("basis", basis.to(start), persistent=False)
        self.R = nn.Parameter(torch.zeros(rank, rank, device=start.device, dtype=start.dtype))
        self.sync()

    def current(self) -> Tensor:
        return self.start + self.basis @ self.R

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.current())

    def sync(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.current())


def _latent_layers(model: nn.Module, adapter: str | None = None
                   ) -> list[tuple[str, LoraLayer, str]]:
    """(module name, LoRA layer, adapter) of every lora_B that is a LatentB now."""
    return [(name, module, key) for name, module in model.named_modules()
            if isinstance(module, LoraLayer) for key, lora_b in module.lora_B.items()
            if isinstance(lora_b, LatentB) and adapter in (None, key)]


def install_latent(model: PeftModel, seed: int) -> None:
    """Fed-SB on the training adapter: each lora_B becomes B_start + B_0 R with R = 0
    trainable (B_0 from ``fedtune.core.init.seeded_latent_basis``, as the server rebuilds
    it); call after ``activate`` (A frozen there)."""
    adapter = training_adapter(model)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_B:
            continue
        plain = module.lora_B[adapter]
        out_features, rank = plain.weight.shape
        basis = seeded_latent_basis(seed, name, out_features, rank)
        module.lora_B[adapter] = LatentB(plain.weight.detach(), basis.to(plain.weight.device))


def latent_R(model: PeftModel) -> dict[str, Tensor]:
    """Module name -> its trained R (fp32 CPU copies) on the training adapter."""
    return {name: module.lora_B[key].R.detach().to("cpu", torch.float32, copy=True)
            for name, module, key in _latent_layers(model, training_adapter(model))}


def _sync_latent(model: nn.Module) -> None:
    for _, module, key in _latent_layers(model):
        module.lora_B[key].sync()


def uninstall_latent(model: nn.Module) -> None:
    """Plain lora_B Linear layers back, holding the B each LatentB reached (a cached model
    serves other aggregators' sessions next)."""
    for _, module, key in _latent_layers(model):
        latent = module.lora_B[key]
        latent.sync()
        plain = nn.Linear(latent.in_features, latent.out_features, bias=False,
                          device=latent.weight.device, dtype=latent.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(latent.weight)
        module.lora_B[key] = plain


# --------------------------------------------------------------------------- state


def _lora_tensors(model: PeftModel, adapter: str | None = None) -> dict[str, Tensor]:
    """Live LoRA tensors. ``save_embedding_layers=False``: clients never ship embeddings,
    and peft's 'auto' probes the Hub for the base config on every call."""
    return get_peft_model_state_dict(
        model, adapter_name=adapter or training_adapter(model), save_embedding_layers=False
    )


def adapter_state(model: PeftModel) -> dict[str, Tensor]:
    """LoRA tensors under peft's portable keys, as detached fp32 CPU copies (with Fed-SB's
    latent B installed, its current B; its R and buffers are not LoRA tensors)."""
    _sync_latent(model)
    return {
        key: value.detach().to(device="cpu", dtype=torch.float32, copy=True)
        for key, value in _lora_tensors(model).items()
        if key.endswith((_LORA_A_SUFFIX, _LORA_B_SUFFIX))
    }


def _describe(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _state_mismatches(expected: dict[str, Tensor], state: dict[str, Tensor]) -> list[str]:
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    wrong = [
        f"{key} has shape {tuple(state[key].shape)}, model expects {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if wrong:
        problems.append(f"shape mismatches: {_describe(wrong, 3)}")
    return problems


def load_adapter_state(model: PeftModel, state: dict[str, Tensor]) -> None:
    """Copy exactly the model's LoRA keys from ``state``; anything else is a ValueError."""
    _load_into(model, state, training_adapter(model))


def _load_into(model: PeftModel, state: dict[str, Tensor], adapter: str) -> None:
    problems = _state_mismatches(_lora_tensors(model, adapter), state)
    if problems:
        raise ValueError("adapter state does not fit this model: " + "; ".join(problems))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    # peft lists every other adapter's keys as missing; only this adapter's count
    leftover = [k for k in [*result.missing_keys, *result.unexpected_keys]
                if "lora_" in k and f".{adapter}." in k]
    if leftover:
        raise ValueError(f"peft did not load LoRA keys: {_describe(sorted(leftover))}")


def _pad_ranks(state: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    padded = {}
    for key, value in state.items():
        missing = rank - (value.shape[0] if key.endswith(_LORA_A_SUFFIX) else value.shape[1])
        if missing > 0 and key.endswith(_LORA_A_SUFFIX):
            value = torch.cat([value, value.new_zeros(missing, value.shape[1])], dim=0)
        elif missing > 0:
            value = torch.cat([value, value.new_zeros(value.shape[0], missing)], dim=1)
        padded[key] = value
    return padded


# --------------------------------------------------------------------------- export


def _module_ranks(state: dict[str, Tensor]) -> dict[str, int]:
    """Rank per adapted module, keyed by module path relative to the base model."""
    ranks = {}
    for key, value in state.items():
        if key.endswith(_LORA_A_SUFFIX):
            module = key.removesuffix(_LORA_A_SUFFIX).removeprefix(_PEFT_PREFIX)
            ranks[module] = int(value.shape[0])
    if not ranks:
        raise ValueError("adapter state holds no '*.lora_A.weight' tensors; nothing to save")
    return ranks


def _export_config(
    state: dict[str, Tensor], spec: LoraSpec, name: str, rank: int | None, alpha: float | None
) -> LoraConfig:
    """Config for the saved tensors, whose rank may differ from training (e.g. stacking).

    By default ``r`` and ``lora_alpha`` are the configured ones (peft's convention: the
    factors are as trained, at scale alpha / r); ``rank``/``alpha`` override them. Modules
    whose rank differs from ``r`` get ``rank_pattern``/``alpha_pattern`` entries with the
    same scale alpha / r.
    """
    ranks = _module_ranks(state)
    main_rank = spec.rank if rank is None else rank
    alpha = spec.alpha if alpha is None else alpha
    scale = alpha / main_rank
    odd = {module: r for module, r in sorted(ranks.items()) if r != main_rank}
    return _lora_config(
        spec,
        r=main_rank,
        lora_alpha=alpha,
        rank_pattern=odd,
        alpha_pattern={module: scale * r for module, r in odd.items()},
        base_model_name_or_path=name,
    )


def save_peft_adapter(
    out_dir: str | Path,
    state: dict[str, Tensor],
    spec: LoraSpec,
    base_model_name: str,
    rank: int | None = None,
    alpha: float | None = None,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write a standard peft adapter folder atomically; returns its path.

    ``state`` holds the factors at the scale ``alpha / rank`` (by default the spec's);
    ``extras(folder)`` writes more files into the folder before it appears (tokenizer,
    model card), so a reader never sees an adapter without them.
    """
    out = Path(out_dir)
    config = _export_config(state, spec, base_model_name, rank, alpha)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    with atomic_directory(out) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if extras is not None:
            extras(tmp)
    return out


def save_global_factors(
    out_dir: str | Path,
    factors: Mapping[str, LoraFactors],
    spec: LoraSpec,
    base_model_name: str,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Export a global adapter by peft's conventions: ``lora_alpha`` and ``r`` as
    configured (``spec``) and every module's factors at the configured scale alpha / r.

    Factors an aggregator keeps at that scale (fedavg, ffa, fedsb, lorafair, and zeropad
    / hetlora when the clients share it) are written exactly as they are: what a client
    of the scenario's settings would load to go on training. Factors held at another
    scale (1 after a recompression: flexlora, flora's stack, zeropad with mixed scales)
    are re-expressed at the configured one, B absorbing the ratio (A untouched), so the
    update ``scale * B @ A`` is unchanged; modules whose rank is not ``r`` get
    ``rank_pattern`` / ``alpha_pattern`` entries with the same scale."""
    target = spec.scale
    rescaled = {name: LoraFactors(A=f.A, B=f.B * (f.scale / target), scale=target)
                for name, f in factors.items()}
    return save_peft_adapter(out_dir, state_dict_from_factors(rescaled), spec,
                             base_model_name, extras=extras)


def save_folded_adapter(out_dir: str | Path, state: dict[str, Tensor], spec: LoraSpec,
                        base_model_name: str, extras: Callable[[Path], None] | None = None
                        ) -> Path:
    """Save a scale-folded state (its update is exactly B @ A, as the server's final
    message carries it) by peft's conventions (see ``save_global_factors``)."""
    return save_global_factors(out_dir, factors_from_state_dict(state, 1.0), spec,
                               base_model_name, extras=extras)


def exported_update(folder: str | Path) -> dict[str, Tensor]:
    """An exported adapter's tensors with each module's peft scale folded into B (its
    update is exactly B @ A, as ``load_frozen_global`` applies it)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = LoraConfig.from_pretrained(str(folder))
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    scales = {}
    for module, rank in _module_ranks(state).items():
        alpha = config.alpha_pattern.get(module, config.lora_alpha)
        expected = config.rank_pattern.get(module, config.r)
        if expected != rank:
            raise ValueError(f"{folder}: module {module} has rank {rank} but the config "
                             f"says {expected}")
        scales[_PEFT_PREFIX + module] = alpha / rank
    return scale_folded_state_dict(factors_from_state_dict(state, scales))
