from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedtune.model import (
    LoraSpec,
    ModelSpec,
    adapter_state,
    cache,
    cache_info,
    clear,
    get_peft_model,
)


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    clear()
    yield
    clear()


def test_second_call_reuses_the_loaded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    real_load = cache.load_base_model
    loads = []
    monkeypatch.setattr(
        cache, "load_base_model", lambda spec: loads.append(spec) or real_load(spec)
    )
    spec, lora = ModelSpec(source="tiny"), LoraSpec()

    model, tokenizer = get_peft_model(spec, lora, seed=0)
    again, tok_again = get_peft_model(ModelSpec(source="tiny"), LoraSpec(), seed=0)
    assert again is model and tok_again is tokenizer
    assert len(loads) == 1
    info = cache_info()
    assert (info.loads, info.hits, info.size) == (1, 1, 1)
    assert adapter_state(model)  # it is a LoRA-wrapped model

    other, _ = get_peft_model(spec, lora, seed=1)
    assert other is not model
    assert cache_info().loads == 2 and len(loads) == 2


def test_clear_forgets_models() -> None:
    model, _ = get_peft_model(ModelSpec(source="tiny"), LoraSpec(), seed=0)
    clear()
    assert cache_info() == (0, 0, 0)
    assert get_peft_model(ModelSpec(source="tiny"), LoraSpec(), seed=0)[0] is not model
    assert cache_info().loads == 1
