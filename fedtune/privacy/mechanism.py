"""Client-level DP aggregation (DP-FedAvg): clip each client's update, sum, divide by the
fixed number of clients sampled, add Gaussian noise of standard deviation z * C / m.

Adding or removing one client changes the clipped sum by at most C, so the released
aggregate is a Gaussian mechanism with noise multiplier z whatever the data. Two things
make that true and are therefore not optional here: the update is taken against the start
the server itself sent (a public value), and the denominator m is the number of clients
*sampled*, not the number that replied, with equal weights (example counts would leak).

Two forms, chosen by aggregator:

* ``factor`` (fedavg, zeropad, ffa): the released sum is the clients' factor updates
  (dA, dB; for ffa only dB, A is frozen and public), zero-padded to the release's rank
  and expressed at the global adapter's scale. The release's shape is the population's
  (its largest rank, from round 1), never that of the clients sampled, so the shape says
  nothing about who took part. The clip norm bounds exactly that vector (the padding is
  zeros: sensitivity C whatever the shape); the noise goes on every trainable entry.
* ``dense`` (flora, flexlora): the released sum is the clients' weight-space updates
  ``s_k B_k A_k - start`` summed per module as a dense out x in matrix (the clip uses
  their Frobenius norm, computed in factored form); noise goes on that dense sum and the
  result is projected back to low rank by truncated SVD, which is post-processing and
  costs no privacy. It needs out x in floats per module on the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedtune.core.adapters import ClientUpdate, LoraFactors
from fedtune.core.lowrank import pad_cols, pad_rows, truncate
from fedtune.privacy.clip import clip_factor, clip_to_norm, product_norm
from fedtune.privacy.noise import GaussianNoise

FORMS = ("factor", "dense")


class PrivacyError(ValueError):
    """The updates of a round cannot be released by the mechanism."""


@dataclass(frozen=True)
class ClientLevelDP:
    """C, z and m of one round's mechanism. ``clip`` and ``add_noise`` are False in
    distributed mode, where each client clipped and noised its own update."""

    clip_norm: float
    noise_multiplier: float
    sampled: float  # the fixed denominator: the expected cohort q * N, never the replies
    clip: bool = True
    add_noise: bool = True

    def __post_init__(self) -> None:
        if self.clip_norm <= 0:
            raise ValueError(f"clip norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.sampled > 0:
            raise ValueError(f"the expected cohort must be > 0 clients, got {self.sampled}")

    @property
    def noise_std(self) -> float:
        """z * C / m: the standard deviation of the noise on the averaged update."""
        return self.noise_multiplier * self.clip_norm / self.sampled


@dataclass
class Release:
    """The noised aggregate and what the mechanism saw (for the round's metrics)."""

    factors: dict[str, LoraFactors]
    norms: list[float] = field(default_factory=list)  # each client's norm before clipping
    clipped: int = 0  # how many clients were scaled down
    noise_std: float = 0.0
    released: int = 0  # d: how many entries the noise went on

    def noise_to_signal(self, clip_norm: float) -> float:
        """sigma sqrt(d) / C: the noise's norm on the average over the largest norm the
        average of clipped updates can have. Above 1 the noise drowns every update."""
        return self.noise_std * math.sqrt(self.released) / clip_norm

    def metrics(self) -> dict[str, float]:
        norms = self.norms or [0.0]
        return {"dp_update_norm_mean": sum(norms) / len(norms), "dp_update_norm_max": max(norms),
                "dp_clipped_fraction": self.clipped / max(1, len(self.norms)),
                "dp_noise_std": self.noise_std}


def _start(update: ClientUpdate, module: str) -> LoraFactors:
    if update.start is None or module not in update.start:
        raise PrivacyError(
            f"client {update.client_id or '?'}: differential privacy needs the start the "
            f"server sent for module {module!r} (the update is taken against it)")
    return update.start[module]


# ---- factor form -------------------------------------------------------------------------
def factor_delta(update: ClientUpdate, base: Mapping[str, LoraFactors],
                 trainable: Sequence[str]) -> dict[str, Tensor]:
    """One client's update, zero-padded to the base rank and at the base's scale, keyed
    ``module/A`` and ``module/B`` (only the trainable fields)."""
    out = {}
    for module, ref in base.items():
        final, start = update.factors[module], _start(update, module)
        if "A" in trainable:
            out[f"{module}/A"] = pad_rows(final.A - start.A, ref.rank)
        if "B" in trainable:
            fold = final.scale / ref.scale
            out[f"{module}/B"] = pad_cols((final.B - start.B * start.scale / final.scale)
                                          * fold, ref.rank)
    return out


def check_fits(updates: Sequence[ClientUpdate], base: Mapping[str, LoraFactors]) -> None:
    """Every update fits the release's shape: its modules are the base's and its rank is
    at most the base's. The shape is the population's, fixed before round 1, never
    widened to the clients sampled (a wider release would say that a wide client took
    part, and for that client amplification by sampling would not hold)."""
    for update in updates:
        if set(update.factors) != set(base):
            raise PrivacyError(f"client {update.client_id or '?'}: its modules are not the "
                               "release's")
        wide = [m for m, f in update.factors.items() if f.rank > base[m].rank]
        if wide:
            raise PrivacyError(
                f"client {update.client_id or '?'}: rank {update.factors[wide[0]].rank} is "
                f"above the release's rank {base[wide[0]].rank} (the population's largest, "
                "fixed before round 1)")


def factor_release(updates: Sequence[ClientUpdate], base: Mapping[str, LoraFactors] | None,
                   dp: ClientLevelDP, noise: GaussianNoise, trainable: Sequence[str] = ("A", "B")
                   ) -> Release:
    """base + (sum of clipped factor updates) / m + N(0, (z C / m)^2) on trainable entries.

    ``base`` is public and has the release's shape: the previous global adapter, or in
    the first round the seeded start of a client of the population's largest rank. Each
    update is zero-padded to it, so the padding carries only noise, and the noise goes on
    every entry of that shape, whoever was sampled. With no update (nobody sampled, or
    nobody replied) the release is pure noise on the base: a round that touched no data
    looks like any other."""
    if base is None:
        raise PrivacyError("a factor release needs its base: the public adapter of the "
                           "population's shape the noised sum is added to")
    check_fits(updates, base)
    total = {f"{m}/{f}": torch.zeros_like(getattr(ref, f), dtype=torch.float64)
             for m, ref in base.items() for f in trainable}
    release = Release(factors={})
    for update in updates:
        delta = factor_delta(update, base, trainable)
        if dp.clip:
            delta, norm, factor = clip_to_norm(delta, dp.clip_norm)
            release.norms.append(norm)
            release.clipped += factor < 1.0
        for key, value in delta.items():
            total[key] += value.double()
    std = dp.noise_std if dp.add_noise else 0.0
    release.noise_std = std
    for module, ref in base.items():
        fields = {"A": ref.A, "B": ref.B}
        for f in trainable:  # sorted module order, A before B: reproducible draws
            summed = total[f"{module}/{f}"] / dp.sampled
            summed += noise.sample(summed.shape, std, torch.float64)
            release.released += summed.numel()
            fields[f] = (fields[f].double() + summed).to(fields[f].dtype)
        release.factors[module] = LoraFactors(A=fields["A"], B=fields["B"], scale=ref.scale)
    return release


# ---- dense form --------------------------------------------------------------------------
def weight_update_pair(update: ClientUpdate, module: str) -> tuple[Tensor, Tensor]:
    """(B', A') with B' A' = s B A - s0 B0 A0: the client's weight-space update of one
    module as one stacked factor pair (never dense)."""
    final, start = update.factors[module], _start(update, module)
    B = torch.cat([final.B * final.scale, -start.B * start.scale], dim=1)
    A = torch.cat([final.A, start.A], dim=0)
    return B, A


def dense_release(updates: Sequence[ClientUpdate], previous: Mapping[str, LoraFactors] | None,
                  dp: ClientLevelDP, noise: GaussianNoise, rank: int | None) -> Release:
    """Truncated SVD (to ``rank``, or the largest client rank) of
    previous + (sum of clipped weight updates) / m + dense N(0, (z C / m)^2)."""
    if not updates and previous is None:
        raise PrivacyError("a round without updates needs the adapter to add noise to")
    modules = sorted(updates[0].factors) if updates else sorted(previous)
    release = Release(factors={})
    total: dict[str, Tensor] = {}
    for update in updates:
        pairs = {m: weight_update_pair(update, m) for m in modules}
        factor = 1.0
        if dp.clip:
            norm = product_norm(pairs)
            factor = clip_factor(norm, dp.clip_norm)
            release.norms.append(norm)
            release.clipped += factor < 1.0
        for m, (B, A) in pairs.items():
            dense = (B.double() * factor) @ A.double()
            total[m] = total[m] + dense if m in total else dense
    std = dp.noise_std if dp.add_noise else 0.0
    release.noise_std = std
    keep = rank or max([u.factors[m].rank for u in updates for m in modules]
                       or [previous[m].rank for m in modules])
    for m in modules:
        like = updates[0].factors[m] if updates else previous[m]
        shape = (like.B.shape[0], like.A.shape[1])
        summed = total.get(m, torch.zeros(shape, dtype=torch.float64)) / dp.sampled
        summed += noise.sample(summed.shape, std, torch.float64)
        release.released += summed.numel()
        if previous is not None and m in previous:
            summed += previous[m].delta().double()
        identity = torch.eye(summed.shape[1], dtype=torch.float64)
        cut = truncate(summed, identity, keep)
        dtype = like.A.dtype
        release.factors[m] = LoraFactors(A=cut.A.to(dtype), B=cut.B.to(dtype), scale=1.0)
    return release


# ---- distributed mode: the client's side ---------------------------------------------------
def local_release(delta: Mapping[str, Tensor], clip_norm: float, noise_std: float,
                  noise: GaussianNoise) -> tuple[dict[str, Tensor], float]:
    """A client's clipped update plus its share of the noise (in sorted key order, so a
    seeded draw is reproducible), and the update's norm before clipping."""
    clipped, norm, _ = clip_to_norm(delta, clip_norm)
    noisy = {k: clipped[k] + noise.sample(clipped[k].shape, noise_std, clipped[k].dtype)
             for k in sorted(clipped)}
    return noisy, norm
