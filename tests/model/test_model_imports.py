"""fedtune.model.imports: bitsandbytes' torch.compile calls are deferred to each kernel's
first call, compile once, and give the compiled kernel's result (the import itself is
checked in a fresh interpreter by tests/test_architecture.py)."""

from __future__ import annotations

import pytest
import torch

from fedtune.model.imports import deferred, import_bitsandbytes


def _counting_compiler(calls: list):
    def compile_now(fn, **options):
        calls.append(options)
        return lambda *args, **kwargs: ("compiled", fn(*args, **kwargs))

    return compile_now


def test_compiles_at_the_first_call_once_with_the_options():
    calls: list = []
    compile_later = deferred(_counting_compiler(calls))
    kernel = compile_later(lambda x, y=1: x + y, dynamic=False)
    assert calls == []  # nothing compiled at creation
    assert kernel(2, y=3) == ("compiled", 5)
    assert kernel(4) == ("compiled", 5)
    assert calls == [{"dynamic": False}]


def test_the_decorator_form_defers_too():
    calls: list = []

    @deferred(_counting_compiler(calls))(mode="reduce-overhead")
    def double(x):
        return 2 * x

    assert calls == []
    assert double(21) == ("compiled", 42) and calls == [{"mode": "reduce-overhead"}]


def test_a_failing_compile_raises_at_the_call_where_bitsandbytes_falls_back():
    def compile_now(fn, **options):
        raise RuntimeError("no C++ compiler")

    kernel = deferred(compile_now)(lambda x: x)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        kernel(1)


def test_importing_again_leaves_torch_compile_alone():
    import bitsandbytes  # noqa: F401  (already imported through fedtune.model)

    before = torch.compile
    import_bitsandbytes()
    assert torch.compile is before
