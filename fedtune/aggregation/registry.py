"""Name -> aggregator class: the one place config, strategy, DP and compare ask about one.

An aggregator registers itself with ``@register`` in its own file; the package's
``__init__`` imports every file of the package, so the built-in ones are all available.
Adding an aggregator touches its own file and its test only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedtune.aggregation.base import Aggregator, Capabilities, option_names

_REGISTRY: dict[str, type[Aggregator]] = {}

#: The option keys each capability stands for: a class must declare both or neither.
_CAPABILITY_KEYS = {"merges": ("merge", "ties_density"), "pads": ("padding",),
                    "prunes": ("prune_gamma",)}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator / call that makes an aggregator available by its name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _check_declarations(cls)
    _REGISTRY[cls.name] = cls
    return cls


def _check_declarations(cls: type[Aggregator]) -> None:
    """Capabilities and Options must tell the same story (e.g. merges <=> a merge key)."""
    if not isinstance(cls.capabilities, Capabilities):
        raise TypeError(f"{cls.__name__}.capabilities must be a Capabilities, "
                        f"got {cls.capabilities!r}")
    keys = set(option_names(cls.Options))  # raises TypeError for a non-dataclass
    for capability, needed in _CAPABILITY_KEYS.items():
        declared = getattr(cls.capabilities, capability)
        if declared != set(needed).issubset(keys):
            raise TypeError(
                f"{cls.__name__}: capabilities.{capability} = {declared} but its Options "
                f"{'lack' if declared else 'have'} {', '.join(needed)}")


def unregister(name: str) -> None:
    """Forget an aggregator (a test or a plugin that registered one for a while)."""
    aggregator_class(name)  # the error names the available ones
    del _REGISTRY[name]


def available() -> list[str]:
    return sorted(_REGISTRY)


def aggregator_class(name: str) -> type[Aggregator]:
    """The class registered under ``name``; the error lists the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregator {name!r}; available: {', '.join(available())}"
        ) from None


def capabilities_of(name: str) -> Capabilities:
    return aggregator_class(name).capabilities


def options_for(name: str, keys: Mapping[str, Any]) -> Any:
    """The aggregator's Options built from the ``federation`` keys it reads in ``keys``
    (others are ignored; a missing one takes its default)."""
    cls = aggregator_class(name)
    return cls.Options(**{k: keys[k] for k in option_names(cls.Options) if k in keys})


def get_aggregator(name: str, **options: Any) -> Aggregator:
    """Build the aggregator registered under ``name`` with its options."""
    cls = aggregator_class(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"bad options for aggregator {name!r}: {err}") from None
