"""The shared seeded LoRA initialisation, as a pure function of (seed, module, shape).

peft's default init is A ~ kaiming-uniform(a=sqrt 5), B = 0. Drawing A from a CPU
generator seeded by (run seed, module name) makes it identical in every process and on
every device, so the server can rebuild the exact tensors a client started from without
holding a model (it needs them to turn a sparse upload's deltas back into factors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedtune.core.codec import A_SUFFIX, B_SUFFIX, module_name
from fedtune.core.seeds import latent_basis_seed, lora_init_seed


def seeded_lora_A(seed: int, module: str, shape: tuple[int, ...]) -> Tensor:
    """The fresh A of ``module`` ([rank, in], float32), as every client draws it."""
    generator = torch.Generator(device="cpu").manual_seed(lora_init_seed(seed, module))
    fresh = torch.empty(shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
    return fresh


def seeded_latent_basis(seed: int, module: str, out_features: int, rank: int) -> Tensor:
    """Fed-SB's fixed B_0 of ``module`` ([out, rank], float32): N(0, 1/rank) entries, so
    its columns have norm ~ sqrt(out / rank) and a step of size lr on every entry of the
    r x r matrix R moves each column of B_0 R by ~ lr * sqrt(out), as a plain LoRA step on
    B does. Drawn from a CPU generator: identical on the server and on every client."""
    generator = torch.Generator(device="cpu").manual_seed(latent_basis_seed(seed, module))
    basis = torch.randn((out_features, rank), generator=generator, dtype=torch.float32)
    return basis / math.sqrt(rank)


def seeded_lora_state(seed: int, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """A fresh LoRA state dict (peft keys -> tensors) for the given key shapes."""
    state = {}
    for key, shape in shapes.items():
        if key.endswith(A_SUFFIX):
            state[key] = seeded_lora_A(seed, module_name(key), tuple(shape))
        elif key.endswith(B_SUFFIX):
            state[key] = torch.zeros(tuple(shape), dtype=torch.float32)
        else:
            module_name(key)  # raises CodecError naming the key
    return state
