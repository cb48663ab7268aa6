"""Where a client's LoRA starts in a round: one pure function both ends call.

The client calls it on its freshly reset (seeded) LoRA to set up training; the server
calls it on the same seeded init rebuilt from ``fedtune.core.init`` to know what a client
started from, which turns a sparse upload's deltas back into factors. Plain peft-keyed
state dicts in and out; nothing here touches a model.
"""

from __future__ import annotations

from torch import Tensor

from fedtune.aggregation.base import ClientMode
from fedtune.aggregation.flora import split_top
from fedtune.core.adapters import LoraFactors
from fedtune.core.codec import A_SUFFIX, factors_from_state_dict, state_dict_from_factors

State = dict[str, Tensor]  # peft key -> tensor


def overlay(fresh: State, head: State) -> State:
    """``fresh`` LoRA tensors with their first components replaced by ``head``'s (which
    may have fewer components, never more)."""
    out = {}
    for key, value in fresh.items():
        value = value.clone()
        part = head[key]
        if key.endswith(A_SUFFIX):
            value[: part.shape[0]] = part
        else:
            value[:, : part.shape[1]] = part
        out[key] = value
    return out


def start_from_global(global_state: State, fresh: State, scale: float, rank: int
                      ) -> tuple[State, State]:
    """FLoRA with ``init = "global"``: the LoRA starts from the global adapter's top-r
    components (rescaled for the client's scale; beyond the global rank it keeps its
    fresh seeded rows), and the remaining components are applied frozen. Their sum is
    exactly the global adapter, so training starts from the global model."""
    top, rest = {}, {}
    for name, factors in factors_from_state_dict(global_state, 1.0).items():
        head, rest[name] = split_top(factors, rank)
        top[name] = LoraFactors(A=head.A, B=head.B / scale, scale=scale)
    remaining = {} if all(f.rank == 0 for f in rest.values()) else state_dict_from_factors(rest)
    return overlay(fresh, state_dict_from_factors(top)), remaining


def client_start(mode: ClientMode, init: str, payload: State, fresh: State, scale: float,
                 rank: int) -> tuple[State, State]:
    """(trainable LoRA at the start of training, state applied frozen under it).

    continue: the payload (or, in the first round, the shared seeded init) is the LoRA's
    start; a payload of lower rank fills the first components. residual: a fresh seeded
    LoRA trains on top of the payload applied frozen; with init "global" it starts from
    the payload's top components and only the rest is frozen.
    """
    if mode == "residual":
        if payload and init == "global":
            return start_from_global(payload, fresh, scale, rank)
        return fresh, payload
    return (overlay(fresh, payload) if payload else fresh), {}


def sliced_like(state: State, like: State) -> State:
    """``state`` cut to the (possibly smaller, self-pruned) rank of ``like``."""
    return {k: (v[: like[k].shape[0]] if k.endswith(A_SUFFIX) else v[:, : like[k].shape[1]])
            for k, v in state.items()}
