"""Is this model the federation's base? Architecture and adapted-module shapes compared.

A client may bring its own copy of the base (an application that already has the model
in memory, or a local folder). Its LoRA factors only mean something to the server when
they adapt the same modules with the same shapes, so that is checked before the client
joins, against a weightless (meta-device) build of the federation's base.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from fedtune.config import parse_tiny_seed
from fedtune.model.loading import bundled_model_dir, lent_model

Shapes = dict[str, tuple[int, int]]


class IncompatibleModelError(ValueError):
    """The model is not the federation's base (other architecture or adapted modules)."""


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (module paths without peft's prefix)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def target_shapes(model: nn.Module, targets: Iterable[str]) -> Shapes:
    """(out, in) of every linear module whose last name is a LoRA target; bitsandbytes'
    packed 4-bit weights report their logical sizes through in/out_features."""
    wanted = set(targets)
    shapes: Shapes = {}
    for name, module in _unwrapped(model).named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in wanted and hasattr(module, "in_features") and hasattr(module, "out_features"):
            shapes[name] = (int(module.out_features), int(module.in_features))
    return shapes


def _config_of(source: str) -> PretrainedConfig:
    source = source.strip()
    if source == "smollm2":
        return AutoConfig.from_pretrained(bundled_model_dir())
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    return AutoConfig.from_pretrained(path if path.exists() else source)


@functools.lru_cache(maxsize=8)
def _reference(source: str, targets: tuple[str, ...]) -> tuple[str, tuple[tuple[str, int, int], ...]]:  # noqa: E501
    model: nn.Module
    if parse_tiny_seed(source.strip()) is not None:
        from fedtune.model.tiny import build_byte_tokenizer, tiny_config

        config = tiny_config(build_byte_tokenizer())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model_type = config.model_type
    else:
        config = _config_of(source)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model_type = config.model_type
    shapes = target_shapes(model, targets)
    return model_type, tuple((name, *shape) for name, shape in sorted(shapes.items()))


def describe_base(source: str, targets: Iterable[str]) -> tuple[str, Shapes]:
    """(model type, adapted-module shapes) of a model source, without loading weights."""
    lent = lent_model(source.strip())
    if lent is not None:  # not cached: its name is only unique while it is lent
        return lent[0].config.model_type, target_shapes(lent[0], targets)
    model_type, rows = _reference(source, tuple(sorted(set(targets))))
    return model_type, {name: (out, inp) for name, out, inp in rows}


def _differences(mine: Shapes, theirs: Shapes, limit: int = 4) -> list[str]:
    missing = sorted(set(theirs) - set(mine))
    extra = sorted(set(mine) - set(theirs))
    other = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
    found = []
    if missing:
        found.append(f"lacks {len(missing)} adapted module(s), e.g. {missing[:limit]}")
    if extra:
        found.append(f"has {len(extra)} the base does not, e.g. {extra[:limit]}")
    if other:
        found.append("other shapes: " + ", ".join(
            f"{n} {mine[n]} vs {theirs[n]}" for n in other[:limit]))
    return found


def check_compatible(model: nn.Module | str, base: str, targets: Iterable[str]) -> None:
    """Raise IncompatibleModelError unless ``model`` (a module or a model source) has the
    federation base's architecture and the same LoRA target modules with the same shapes."""
    targets = tuple(sorted(set(targets)))
    if isinstance(model, str):
        model_type, mine = describe_base(model, targets)
        label = f"model {model!r}"
    else:
        model_type = getattr(getattr(_unwrapped(model), "config", None), "model_type", "?")
        mine, label = target_shapes(model, targets), f"the given {type(model).__name__}"
    base_type, theirs = describe_base(base, targets)
    if not mine:
        raise IncompatibleModelError(
            f"{label} has no linear module named {list(targets)} (the federation's LoRA "
            f"targets); it is not the federation's base {base!r}")
    problems = [] if model_type == base_type else [
        f"architecture {model_type!r}, the base's is {base_type!r}"]
    problems += _differences(mine, theirs)
    if problems:
        raise IncompatibleModelError(
            f"{label} is not compatible with the federation's base {base!r}: "
            + "; ".join(problems))
