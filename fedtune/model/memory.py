"""Plan which LoRA rank and base quantization fit a client's memory budget, from config alone.

A client must know *before* loading hundreds of MB whether a setting fits, so everything
here reads only a model's config (``config.json``, GGUF metadata, or the tiny test config)
and computes sizes arithmetically. Units: ``MB`` means MiB (2**20 bytes), matching
``get_memory_footprint() / 2**20`` and ``fedtune.model.device``.

The model is a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM2): per layer
q/k/v/o attention projections, a gated MLP (gate/up/down) and two RMSNorms; biases are
ignored. Terms of an estimate, and where each number comes from:

* ``base_weights_mb`` - the tensor footprint exactly as ``model.get_memory_footprint()``
  reports it: fp32 = 4 B/param; 8-bit = 1 B/param for the decoder's linear layers;
  4-bit NF4 = 0.5 B/param. Embeddings, norms and ``lm_head`` stay fp32 in both quantized
  modes (bitsandbytes skips ``lm_head``; a tied head is counted once). Checked against
  SmolLM2-135M: 513.1 / 209.4 / 158.8 MB predicted and measured.
* ``quant_state_mb`` - bitsandbytes side tensors that ``get_memory_footprint`` does not
  count: one fp32 scale per output row (8-bit); per 64-weight block an 8-bit absmax plus
  one fp32 per 256 blocks with double quantization (4-bit).
* ``load_staging_mb`` - CPU only. Loading a bitsandbytes model on CPU leaves the
  full-precision checkpoint resident, so the process is *larger* than unquantized (SmolLM2
  RSS after load: fp32 +69 MB mmap'd, 8-bit +748 MB, 4-bit +713 MB above the import
  baseline). Modelled as the model's fp32 size. On CUDA the staging copy is freed.
* ``lora_mb`` - trainable LoRA parameters with their gradient and two AdamW moments,
  all fp32: 16 B per parameter, ``rank * (in + out)`` parameters per adapted module.
* ``activations_mb`` - tensors autograd saves for backward, counted with saved-tensor
  hooks on SmolLM2 (exact to <1%) and the tiny model (+5%). Per layer and token, in fp32
  elements: ``2*hidden + 2*q_dim + 2*kv_dim + 3*intermediate`` for the frozen decoder
  with SDPA attention (no seq**2 term; eager attention would add one), plus
  ``2*in + rank`` per adapted module (peft's dropout saves its mask and output; with
  dropout 0 this over-counts). Plus one ``batch * seq * vocab`` fp32 copy of the logits
  (log-softmax output). In ``hidden`` units this is ~17 x hidden for SmolLM2 on q/v.
* ``workspace_mb`` - transient memory at the peak on top of the saved tensors. CPU,
  measured (SmolLM2, 1x128 to 4x256 tokens, q/v and all-linear targets): peak RSS grows by
  1.78 x the saved activations (glibc keeps freed forward temporaries), so 0.78 x.
  CUDA, assumed (no GPU measurement yet): the logits' gradient and log-softmax gradient
  (2 x logits) plus one layer's saved activations being differentiated.
* ``runtime_mb`` - fixed per process. CPU: measured 426 MB RSS after importing torch,
  transformers, peft and bitsandbytes, plus 53 MB fixed growth in the first training
  step. CUDA: an assumed 600 MB for the CUDA context, cuBLAS workspace and caching
  allocator slack (budgets on CUDA are GPU memory; host RAM is not counted).

So for ``device="cpu"`` the total plans the process's peak resident set (validated on
SmolLM2 4x128 q/v r=8: fp32 predicted 2,173 vs 2,178 MB peak RSS measured; 8-bit 2,383
vs 2,570; 4-bit 2,333 vs 2,427), and for ``device="cuda"`` the GPU memory in use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedtune.config import parse_tiny_seed
from fedtune.model.sources import (
    BUNDLED_CACHE_NAME,
    TINY_SHAPE,
    TINY_VOCAB_SIZE,
    ModelNotFoundError,
    bundled_gguf_path,
    cache_root,
)

MB = 2**20
QUANTIZATIONS = ("none", "8bit", "4bit")  # least aggressive first: plan() tries them in order
DEVICES = ("cpu", "cuda")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FP32 = 4
ADAM_COPIES = 4  # parameter, gradient, exp_avg, exp_avg_sq
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize
NF4_NESTED_BLOCK = 256  # double quantization: one fp32 per 256 absmax values
CPU_RUNTIME_MB = 426.0 + 53.0
CUDA_RUNTIME_MB = 600.0
CPU_WORKSPACE_FACTOR = 0.78

Device = Literal["cpu", "cuda"]


class MemoryBudgetError(ValueError):
    """No configuration fits the budget; ``smallest`` is what the leanest one would need."""

    def __init__(self, message: str, budget_mb: float, smallest: MemoryEstimate) -> None:
        super().__init__(message)
        self.budget_mb = budget_mb
        self.smallest = smallest


# --------------------------------------------------------------------------- dimensions


@dataclass(frozen=True)
class ModelDims:
    """The shapes that decide memory; ``modules`` maps LoRA target name -> (in, out)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    modules: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modules:
            object.__setattr__(self, "modules", _llama_modules(self))

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder's linear layers (what bitsandbytes quantizes)."""
        return self.num_layers * sum(i * o for i, o in self.modules.values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def full_precision_params(self) -> int:
        """Parameters bitsandbytes leaves in full precision (embeddings, norms, lm_head)."""
        return self.embedding_params + self.lm_head_params + self.norm_params

    @property
    def total_params(self) -> int:
        return self.linear_params + self.full_precision_params

    def max_rank(self, target_modules: Iterable[str]) -> int:
        """A LoRA rank above min(in, out) of any target adds nothing but parameters."""
        return min(min(self.modules[name]) for name in check_targets(self, target_modules))


def _llama_modules(dims: ModelDims) -> dict[str, tuple[int, int]]:
    h, i = dims.hidden_size, dims.intermediate_size
    return {
        "q_proj": (h, dims.q_dim),
        "k_proj": (h, dims.kv_dim),
        "v_proj": (h, dims.kv_dim),
        "o_proj": (dims.q_dim, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


#: where a Llama-style decoder layer keeps each LoRA target (transformers' module paths)
_LLAMA_BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                 "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def adapted_modules(dims: ModelDims, target_modules: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) of every module LoRA adapts, every layer, from the config
    alone: what a server checks replies against without loading the model. The paths
    are a Llama-style decoder's (``model.layers.<i>.self_attn.q_proj``), the same family
    this module's estimates assume."""
    targets = check_targets(dims, target_modules)
    return {f"model.layers.{layer}.{_LLAMA_BLOCKS[t]}.{t}": dims.modules[t]
            for layer in range(dims.num_layers) for t in targets}


def check_targets(dims: ModelDims, target_modules: Iterable[str]) -> tuple[str, ...]:
    """Validate LoRA target names against the model's modules (before any estimate)."""
    if isinstance(target_modules, str):
        raise ValueError(f"target_modules must be a list of names, not {target_modules!r}")
    targets = tuple(target_modules)
    unknown = [t for t in targets if t not in dims.modules]
    if not targets or unknown:
        raise ValueError(
            f"target_modules {list(targets)!r} invalid: unknown {unknown!r}; "
            f"allowed: a non-empty subset of {', '.join(dims.modules)}"
        )
    return targets


def dims_from_config(config: Mapping[str, Any]) -> ModelDims:
    """ModelDims from a transformers config dict (``config.json`` keys)."""
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        dims = ModelDims(
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            # transformers' own default differs by class; False counts lm_head (safe side)
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise ValueError(
            f"model config lacks {err.args[0]!r}; the memory estimator needs a Llama-style "
            "decoder config (hidden_size, num_hidden_layers, num_attention_heads, "
            "intermediate_size, vocab_size)"
        ) from None
    return dims


def dims_from_gguf(path: Path) -> ModelDims:
    """ModelDims from GGUF metadata (~3 s: the reader parses the token list, not weights)."""
    from gguf import GGUFReader  # optional heavy import, only for GGUF sources

    reader = GGUFReader(path)

    def value(key: str, default: Any = None) -> Any:
        entry = reader.fields.get(key)
        return default if entry is None else entry.contents()

    arch = value("general.architecture", "llama")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = value(f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    config = {
        "hidden_size": value(f"{arch}.embedding_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": value(f"{arch}.attention.head_count"),
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
        "head_dim": value(f"{arch}.attention.key_length"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    return dims_from_config({k: v for k, v in config.items() if v is not None})


def _read_config_json(folder: Path) -> ModelDims:
    return dims_from_config(json.loads((folder / "config.json").read_text()))


def _bundled_dims() -> ModelDims:
    """The converted cache's config if present, else the GGUF header: never converts."""
    cached = cache_root() / "models" / BUNDLED_CACHE_NAME / "config.json"
    if cached.is_file():
        return _read_config_json(cached.parent)
    return dims_from_gguf(bundled_gguf_path())


def _tiny_dims() -> ModelDims:
    return dims_from_config({**TINY_SHAPE, "vocab_size": TINY_VOCAB_SIZE})


def _hub_cached_dims(repo_id: str) -> ModelDims:
    """A Hub id's config.json from the local HF cache only (planning must not download)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id either
        found = None
    if not isinstance(found, str):
        raise ModelNotFoundError(
            f"model source {repo_id!r}: no local config.json to plan memory from (not a local "
            "folder or .gguf file, and not in the Hugging Face cache); use 'smollm2', 'tiny', "
            "a local folder with config.json, or a .gguf file"
        )
    return _read_config_json(Path(found).parent)


def model_dims(source: str) -> ModelDims:
    """Dimensions of a model source (as in ``ModelSpec.source``) without loading weights."""
    source = source.strip()
    if source == "smollm2":
        return _bundled_dims()
    if parse_tiny_seed(source) is not None:
        return _tiny_dims()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return dims_from_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {str(path)!r} has no config.json")
        return _read_config_json(path)
    if source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf"):
        raise ModelNotFoundError(f"model source {source!r}: {path.resolve()} does not exist")
    return _hub_cached_dims(source)


# --------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one LoRA training client, by term (all in MB = MiB)."""

    device: str
    quantization: str
    rank: int
    batch_size: int
    seq_len: int
    base_weights_mb: float
    quant_state_mb: float
    load_staging_mb: float
    lora_mb: float
    activations_mb: float
    workspace_mb: float
    runtime_mb: float

    @property
    def total_mb(self) -> float:
        return sum(self.breakdown().values())

    def breakdown(self) -> dict[str, float]:
        """The terms that add up to ``total_mb``, for logs and error messages."""
        return {
            "base_weights": self.base_weights_mb,
            "quant_state": self.quant_state_mb,
            "load_staging": self.load_staging_mb,
            "lora": self.lora_mb,
            "activations": self.activations_mb,
            "workspace": self.workspace_mb,
            "runtime": self.runtime_mb,
        }

    def describe(self) -> str:
        terms = ", ".join(f"{k} {v:,.0f}" for k, v in self.breakdown().items() if v >= 0.5)
        return (
            f"{self.quantization}, rank {self.rank}, batch {self.batch_size} x {self.seq_len} "
            f"tokens on {self.device}: {self.total_mb:,.0f} MB ({terms})"
        )


def base_weight_bytes(dims: ModelDims, quantization: str) -> float:
    """Tensor footprint of the base model, as ``get_memory_footprint()`` counts it."""
    per_linear = {"none": FP32, "8bit": 1.0, "4bit": 0.5}[_choice("quantization", quantization)]
    return dims.linear_params * per_linear + dims.full_precision_params * FP32


def quant_state_bytes(dims: ModelDims, quantization: str) -> float:
    """bitsandbytes scales/absmax that live outside the parameters."""
    if quantization == "8bit":
        return dims.num_layers * sum(out for _, out in dims.modules.values()) * FP32
    if quantization == "4bit":
        blocks = dims.linear_params / NF4_BLOCK
        return blocks * (1 + FP32 / NF4_NESTED_BLOCK)
    return 0.0


def lora_params(dims: ModelDims, rank: int, target_modules: Iterable[str]) -> int:
    """Trainable LoRA parameters: rank * (in + out) per adapted module per layer."""
    per_layer = sum(rank * sum(dims.modules[t]) for t in check_targets(dims, target_modules))
    return dims.num_layers * per_layer


def _layer_elements_per_token(dims: ModelDims, rank: int, targets: tuple[str, ...]) -> int:
    frozen = 2 * dims.hidden_size + 2 * dims.q_dim + 2 * dims.kv_dim + 3 * dims.intermediate_size
    adapters = sum(2 * dims.modules[t][0] + rank for t in targets)
    return frozen + adapters


def activation_bytes(
    dims: ModelDims, rank: int, target_modules: Iterable[str], batch_size: int, seq_len: int
) -> tuple[float, float]:
    """(all saved-for-backward bytes, of which the logits copy) for one micro-batch."""
    targets = check_targets(dims, target_modules)
    tokens = batch_size * seq_len
    layers = dims.num_layers * tokens * _layer_elements_per_token(dims, rank, targets) * FP32
    logits = tokens * dims.vocab_size * FP32
    return layers + logits, logits


def _workspace_bytes(dims: ModelDims, device: str, saved: float, logits: float) -> float:
    if device == "cpu":
        return CPU_WORKSPACE_FACTOR * saved
    one_layer = (saved - logits) / dims.num_layers
    return 2 * logits + one_layer


def estimate(
    dims: ModelDims,
    quantization: str,
    rank: int,
    target_modules: Iterable[str],
    batch_size: int,
    seq_len: int,
    device: Device = "cpu",
) -> MemoryEstimate:
    """Peak memory of LoRA training with these settings (see the module doc for each term)."""
    _choice("quantization", quantization)
    _choice("device", device, DEVICES)
    _positive("rank", rank)
    _positive("batch_size", batch_size)
    _positive("seq_len", seq_len)
    targets = check_targets(dims, target_modules)
    saved, logits = activation_bytes(dims, rank, targets, batch_size, seq_len)
    staging = dims.total_params * FP32 if device == "cpu" and quantization != "none" else 0.0
    return MemoryEstimate(
        device=device,
        quantization=quantization,
        rank=rank,
        batch_size=batch_size,
        seq_len=seq_len,
        base_weights_mb=base_weight_bytes(dims, quantization) / MB,
        quant_state_mb=quant_state_bytes(dims, quantization) / MB,
        load_staging_mb=staging / MB,
        lora_mb=lora_params(dims, rank, targets) * FP32 * ADAM_COPIES / MB,
        activations_mb=saved / MB,
        workspace_mb=_workspace_bytes(dims, device, saved, logits) / MB,
        runtime_mb=CPU_RUNTIME_MB if device == "cpu" else CUDA_RUNTIME_MB,
    )


def _choice(key: str, value: object, allowed: tuple[str, ...] = QUANTIZATIONS) -> str:
    if value not in allowed:
        raise ValueError(f"{key} = {value!r} is not allowed; expected one of {', '.join(allowed)}")
    return str(value)


def _positive(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} = {value!r} is not allowed; expected an integer >= 1")
    return value


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """The chosen quantization and rank, with the estimate that justified them."""

    quantization: str
    rank: int
    estimate: MemoryEstimate
    budget_mb: float

    @property
    def headroom_mb(self) -> float:
        return self.budget_mb - self.estimate.total_mb


def candidate_ranks(dims: ModelDims, target_modules: Iterable[str], max_rank: int) -> list[int]:
    """Powers of two up to ``max_rank`` and the targets' min(in, out), largest first."""
    cap = min(_positive("max_rank", max_rank), dims.max_rank(target_modules))
    ranks = []
    rank = 1
    while rank <= cap:
        ranks.append(rank)
        rank *= 2
    return ranks[::-1]


def _quant_candidates(quantization: str) -> tuple[str, ...]:
    if quantization == "auto":
        return QUANTIZATIONS
    return (_choice("quantization", quantization, (*QUANTIZATIONS, "auto")),)


def _rank_candidates(
    dims: ModelDims, target_modules: tuple[str, ...], rank: int | str, max_rank: int
) -> list[int]:
    if rank == "auto":
        return candidate_ranks(dims, target_modules, max_rank)
    if isinstance(rank, str):
        raise ValueError(f"rank = {rank!r} is not allowed; expected an integer >= 1 or 'auto'")
    cap = dims.max_rank(target_modules)
    if _positive("rank", rank) > cap:
        raise ValueError(
            f"rank = {rank} is not allowed for target_modules {list(target_modules)}: it exceeds "
            f"min(in, out) = {cap} of the smallest target; expected 1 to {cap}"
        )
    return [rank]


def plan(
    dims: ModelDims,
    budget_mb: float,
    target_modules: Iterable[str],
    batch_size: int,
    seq_len: int,
    device: Device = "cpu",
    quantization: str = "auto",
    rank: int | Literal["auto"] = "auto",
    max_rank: int = 64,
) -> Plan:
    """The least aggressive quantization that fits, then the largest rank that fits with it.

    Quantization is chosen first because base-model quality matters more than adapter
    capacity: "auto" takes 8-bit only when no rank fits unquantized. Fixed settings are
    checked, not changed.
    """
    if isinstance(budget_mb, bool) or not isinstance(budget_mb, (int, float)) or budget_mb <= 0:
        raise ValueError(f"budget_mb = {budget_mb!r} is not allowed; expected a number > 0")
    targets = check_targets(dims, target_modules)
    quants = _quant_candidates(quantization)
    ranks = _rank_candidates(dims, targets, rank, max_rank)
    for quant in quants:
        for r in ranks:
            found = estimate(dims, quant, r, targets, batch_size, seq_len, device)
            if found.total_mb <= budget_mb:
                return Plan(quant, r, found, float(budget_mb))
    leanest = (estimate(dims, q, ranks[-1], targets, batch_size, seq_len, device) for q in quants)
    smallest = min(leanest, key=lambda e: e.total_mb)  # on CPU, 4-bit is not the leanest
    raise MemoryBudgetError(
        f"nothing fits the memory budget of {budget_mb:,.0f} MB on {device}: the smallest "
        f"configuration tried ({smallest.describe()}) needs {smallest.total_mb:,.0f} MB; "
        "raise the budget or lower batch_size / seq_len / target_modules"
        + ("" if quantization == "auto" else ", or set quantization = 'auto'"),
        budget_mb=float(budget_mb),
        smallest=smallest,
    )
