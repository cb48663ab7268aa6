"""Using what a federation (or local training) produced: apply, merge, export.

An adapter is found from a run directory (``RUN_DIR/adapter``, what ``fedtune server`` /
``fedtune simulate`` write), an adapter folder, or a ``FederationResult`` /
``LocalResult``. It is applied with peft, so it stays a separate, swappable adapter, or
merged into a plain model that needs neither peft nor fedtune to load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fedtune.runs.rundir import ADAPTER_DIR, SCENARIO_FILE


class AdapterNotFoundError(FileNotFoundError):
    """No peft adapter where one was expected; the message says where it looked."""


def adapter_dir(source: Any) -> Path:
    """The adapter folder of ``source`` (see the module docstring)."""
    found = getattr(source, "adapter", source)
    if found is None:
        raise AdapterNotFoundError(f"{type(source).__name__} holds no adapter (status "
                                   f"{getattr(source, 'status', '?')!r})")
    path = Path(found)
    for candidate in (path, path / ADAPTER_DIR):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise AdapterNotFoundError(f"no adapter at {path}: neither {path / 'adapter_config.json'} "
                               f"nor {path / ADAPTER_DIR / 'adapter_config.json'} exists")


def base_source(adapter: Path) -> str:
    """The fedtune model source of an adapter's base: the run's scenario when the
    adapter sits in a run directory, else the name the adapter records."""
    from fedtune.model.loading import BUNDLED_HUB_ID

    scenario = adapter.parent / SCENARIO_FILE
    if scenario.is_file():
        return str(json.loads(scenario.read_text())["model"]["source"])
    name = json.loads((adapter / "adapter_config.json").read_text()).get(
        "base_model_name_or_path") or ""
    return "smollm2" if name == BUNDLED_HUB_ID else name


def base_of(adapter: Any) -> str:
    """The model source an adapter (run directory, folder or result) was trained on."""
    return base_source(adapter_dir(adapter))


def load_model(source: str = "smollm2", quantization: str = "none", device: str = "cpu"
               ) -> tuple[Any, Any]:
    """(model, tokenizer) of a fedtune model source: "smollm2" (the bundled base),
    "tiny", a local folder or .gguf file, or a Hub id; frozen and in eval mode."""
    from fedtune.config import ModelSpec
    from fedtune.model.loading import load_base_model

    return load_base_model(ModelSpec(source=source, quantization=quantization, device=device))


def _base(model: Any, adapter: Path) -> tuple[Any, Any]:
    """(model, tokenizer or None): the one given, or the adapter's base loaded in full
    precision (merging into a quantized base would round the update away)."""
    if model is not None and not isinstance(model, (str, Path)):
        return model, None
    source = str(model) if model is not None else base_source(adapter)
    if not source:
        raise AdapterNotFoundError(f"the adapter at {adapter} names no base model; pass model=")
    return load_model(source)


def load_adapter(model: Any, adapter: Any) -> Any:
    """``model`` (a loaded transformers model, or a model source; None = the adapter's own
    base) with the adapter applied, ready for ``generate``: a ``PeftModel`` in eval mode.
    The adapter wraps the model you pass; ``unload()`` gives it back."""
    from peft import PeftModel

    folder = adapter_dir(adapter)
    base, _ = _base(model, folder)
    return PeftModel.from_pretrained(base, str(folder)).eval()


def export_adapter(adapter: Any, out: str | Path, merge: bool = False,
                   model: Any = None) -> Path:
    """Write the adapter to ``out``: as a peft adapter folder, or with ``merge`` as a
    plain transformers model (base + adapter folded into the weights, with the
    tokenizer) that loads with ``AutoModelForCausalLM.from_pretrained(out)``."""
    folder = adapter_dir(adapter)
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty; choose another --out")
    if not merge:
        shutil.copytree(folder, target, dirs_exist_ok=True)
        return target
    from peft import PeftModel

    base, tokenizer = _base(model, folder)
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    merged.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target
