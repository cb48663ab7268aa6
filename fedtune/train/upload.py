"""What a client does to its trained LoRA before it leaves: HetLoRA rank self-pruning,
its share of distributed client-level DP, and compression of the update with error
feedback. Pure functions of tensors and settings (the ClientApp keeps the residual in the
node's state; nothing here knows about Flower)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fedtune.aggregation.hetlora import self_prune_rank
from fedtune.aggregation.start import sliced_like
from fedtune.core.codec import A_SUFFIX, B_SUFFIX, factors_from_state_dict
from fedtune.core.compress import CompressionSpec, compress_with_feedback, product_positions
from fedtune.core.seeds import client_noise_seed
from fedtune.privacy import GaussianNoise
from fedtune.privacy.mechanism import local_release

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientDP:
    """Distributed client-level DP: clip the update to ``clip_norm`` and add this client's
    share of the noise (std ``noise_std``) on the factors the server's mechanism releases."""

    clip_norm: float
    noise_std: float
    fields: tuple[str, ...] = ("A", "B")
    #: an experiment run: the share is drawn from the client's seed (whoever knows the
    #: run seed can subtract it); otherwise from OS entropy
    reproducible: bool = False

    def __post_init__(self) -> None:
        unknown = [f for f in self.fields if f not in ("A", "B")]
        if unknown or not self.fields:
            raise ValueError(f"ClientDP.fields = {self.fields!r} is invalid; allowed: "
                             "'A' and/or 'B'")


def prune_rank(state: State, scale: float, gamma: float) -> State:
    """HetLoRA rank self-pruning: keep the first r' components when the rest carry too
    little of the update (criterion in ``fedtune.aggregation.hetlora.self_prune_rank``)."""
    factors = factors_from_state_dict(state, scale)
    keep = self_prune_rank(factors, gamma)
    rank = next(iter(factors.values())).rank
    if keep >= rank:
        return state
    return {k: (v[:keep] if k.endswith(A_SUFFIX) else v[:, :keep]) for k, v in state.items()}


def privatize(state: State, start: State, dp: ClientDP, seed: int) -> tuple[State, float]:
    """The LoRA moved to start + clipped update + this client's share of the noise; and
    the update's norm before clipping."""
    suffixes = tuple(A_SUFFIX if f == "A" else B_SUFFIX for f in dp.fields)
    begun = sliced_like(start, state)
    delta = {k: state[k] - begun[k] for k in state if k.endswith(suffixes)}
    noise = GaussianNoise(client_noise_seed(seed) if dp.reproducible else None)
    noisy, norm = local_release(delta, dp.clip_norm, dp.noise_std, noise)
    out = {k: begun[k] + noisy[k] if k in noisy else v for k, v in state.items()}
    return out, norm


def compressed_update(state: State, start: State, spec: CompressionSpec, residual: State,
                      feedback: bool = True, product_selection: bool = False
                      ) -> tuple[torch.Tensor, State, float]:
    """The update (final LoRA minus its start) compressed as ``spec`` says, after adding
    the error-feedback ``residual`` of earlier rounds; returns the blob, the residual to
    keep for the next round and the norm of the residual carried into this one."""
    delta = {k: state[k] - begun for k, begun in sliced_like(start, state).items()}
    carried = sum(float(r.pow(2).sum()) for k, r in residual.items()
                  if k in delta and r.shape == delta[k].shape) ** 0.5
    select = None
    if product_selection:  # top-k by effect on B @ A per module
        select = functools.partial(product_positions, factors=state, density=spec.density)
    blob, residual = compress_with_feedback(delta, dict(residual), spec, feedback, select)
    return blob, residual, carried
