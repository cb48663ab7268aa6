"""Codec between peft adapter state dicts and core LoRA factors.

peft names an adapter tensor ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``
(adapter name already stripped by ``get_peft_model_state_dict``). We keep those key
names unchanged on the wire so a payload can be loaded back with peft as it is.
Everything here is plain tensors; the Flower ``ArrayRecord`` wrapper lives in
``fedtune.flower.messages`` so that ``core`` never imports Flower.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedtune.core.adapters import LoraFactors

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
WIRE_DTYPE = torch.float32


class CodecError(ValueError):
    """A state dict or payload does not describe a valid set of LoRA factors."""


def module_name(key: str) -> str:
    """Module a peft LoRA key belongs to (the key without its lora_A/lora_B suffix)."""
    for suffix in (A_SUFFIX, B_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise CodecError(f"{key!r} is not a LoRA key (expected it to end in {A_SUFFIX} or {B_SUFFIX})")


def factors_from_state_dict(
    state: Mapping[str, Tensor], scale: float | Mapping[str, float] = 1.0
) -> dict[str, LoraFactors]:
    """Group a peft LoRA state dict into per-module factors.

    ``scale`` is either one value for every module (peft's alpha / r) or a mapping
    from module name to scale.
    """
    a_parts: dict[str, Tensor] = {}
    b_parts: dict[str, Tensor] = {}
    for key, tensor in state.items():
        name = module_name(key)
        (a_parts if key.endswith(A_SUFFIX) else b_parts)[name] = tensor
    missing = sorted(set(a_parts) ^ set(b_parts))
    if missing:
        raise CodecError(f"modules with only one of lora_A / lora_B: {missing[:5]}")
    factors = {}
    for name in sorted(a_parts):
        module_scale = scale[name] if isinstance(scale, Mapping) else scale
        try:
            factors[name] = LoraFactors(
                A=a_parts[name].detach().to(WIRE_DTYPE),
                B=b_parts[name].detach().to(WIRE_DTYPE),
                scale=float(module_scale),
            )
        except ValueError as err:
            raise CodecError(f"module {name!r}: {err}") from err
    return factors


def state_dict_from_factors(factors: Mapping[str, LoraFactors]) -> dict[str, Tensor]:
    """Inverse of :func:`factors_from_state_dict` (scales are not part of the state dict)."""
    state: dict[str, Tensor] = {}
    for name in sorted(factors):
        f = factors[name]
        state[name + A_SUFFIX] = f.A.detach().to(WIRE_DTYPE).contiguous()
        state[name + B_SUFFIX] = f.B.detach().to(WIRE_DTYPE).contiguous()
    return state


def scale_folded_state_dict(factors: Mapping[str, LoraFactors]) -> dict[str, Tensor]:
    """State dict whose effective update is exact with a peft scale of 1.

    Each module's scale is folded into B, so the result can be saved with
    ``lora_alpha == r`` whatever the per-module scales were.
    """
    folded = {
        name: LoraFactors(A=f.A, B=f.B * f.scale, scale=1.0) for name, f in factors.items()
    }
    return state_dict_from_factors(folded)


def payload_nbytes(state: Mapping[str, Tensor]) -> int:
    """Bytes of tensor data in a payload (what travels, headers excluded)."""
    return sum(t.numel() * t.element_size() for t in state.values())
