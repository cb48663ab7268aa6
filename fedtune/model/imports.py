"""The model stack's import, without TorchInductor.

bitsandbytes, which peft imports whenever it is installed, wraps its CPU kernels in
``torch.compile`` as it is imported, and ``torch.compile`` imports TorchInductor (and
sympy, networkx) on the spot: about a fifth of the CPU time of importing the model stack,
paid by every fedtune process (each client, the ServerApp, every simulation worker, every
per-message task) for kernels that compile only when they are first called, if ever (a GPU
run never calls them). :func:`import_bitsandbytes` imports it with ``torch.compile``
deferred to each kernel's first call. Nothing else changes: bitsandbytes falls back to the
plain kernel when compiling fails, at creation or at the call alike.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any


def deferred(compile_now: Callable[..., Callable]) -> Callable[..., Any]:
    """A ``torch.compile`` that compiles ``model`` at its first call, not at once."""

    def compile_later(model: Callable | None = None, **options: Any) -> Any:
        if model is None:  # used as @torch.compile(...)
            return lambda fn: compile_later(fn, **options)
        compiled: Callable | None = None

        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **options)
            return compiled(*args, **kwargs)

        return call

    return compile_later


def import_bitsandbytes() -> None:
    """Import bitsandbytes (if installed and not yet imported) with ``torch.compile``
    deferred; the real ``torch.compile`` is back in place when this returns."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    import torch

    compile_now = torch.compile
    torch.compile = deferred(compile_now)  # type: ignore[assignment]
    try:
        import bitsandbytes  # noqa: F401
    finally:
        torch.compile = compile_now  # type: ignore[assignment]
