"""The arithmetic of secure aggregation, without the protocol: fixed-point quantisation
whose range comes from the clip norm, and masks from a cryptographic PRG, added mod 2^32.

A client's update leaves it as ``q(x) + PRG(b) + sum_j +-PRG(s_ij) mod 2^32``: ``q`` maps
each coordinate of ``[-R, R]`` to an integer of ``bits`` bits, ``b`` is its own random
seed and ``s_ij`` the key it agreed with neighbour ``j`` (the larger node id adds, the
smaller subtracts, so pairwise masks cancel in the sum). The protocol
(``fedtune.flower.secagg``) makes the server able to remove ``PRG(b)`` of the clients whose
vector it summed, and the pairwise masks of those that dropped out, and nothing else.

Why not Flower's own helpers (``flwr.common.secure_aggregation``): its
``pseudo_rand_gen`` folds the 32-byte key into a 32-bit seed for numpy's Mersenne
Twister (a mask anyone can recompute after 2^32 guesses, and predictable from its
output), and its ``quantize`` silently clips values to the range. Here the stream is
ChaCha20 keyed by HKDF-SHA256 of the agreed secret, and a value outside the range is an
error that names how many.

The range: a client clips its update to L2 norm C, so every coordinate is in [-C, C];
under distributed DP it then adds Gaussian noise of std sigma, so R = C + ``NOISE_TAIL``
sigma (one coordinate in about 10^15 falls outside, and is refused, never clipped).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: masks and sums live mod 2^32: a masked vector is as large as the fp32 update
MOD_BITS = 32
WORD = np.dtype("<u4")
#: under distributed DP the range is C + NOISE_TAIL * sigma (P(|N(0,1)| > 8) ~ 1.2e-15)
NOISE_TAIL = 8.0
_NONCE = bytes(16)  # every key streams once (fresh keys each round): a fixed nonce is safe


class RangeError(ValueError):
    """A value to quantise lies outside the range; it is refused, never clipped."""


def quantization_range(clip_norm: float, noise_std: float = 0.0) -> float:
    """R such that a clipped (and noised) update's coordinates all lie in [-R, R]."""
    if clip_norm <= 0 or noise_std < 0:
        raise ValueError(f"clip norm must be > 0 and noise std >= 0, got {clip_norm}, "
                         f"{noise_std}")
    return clip_norm + NOISE_TAIL * noise_std


@dataclass(frozen=True)
class Quantizer:
    """Maps [-R, R] to the integers 0 .. 2^bits - 1 (stochastic rounding, unbiased); a
    sum of n quantised vectors must stay below 2^32 (:meth:`check_capacity`)."""

    value_range: float
    bits: int

    def __post_init__(self) -> None:
        if not self.value_range > 0:
            raise ValueError(f"quantization range must be > 0, got {self.value_range}")
        if not 1 <= self.bits < MOD_BITS:
            raise ValueError(f"quantization bits must be in 1 .. {MOD_BITS - 1}, got "
                             f"{self.bits}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """One quantisation step: the most one client's rounding moves a coordinate."""
        return 2 * self.value_range / self.levels

    def max_clients(self) -> int:
        """How many quantised vectors can be summed mod 2^32 without wrapping."""
        return ((1 << MOD_BITS) - 1) // self.levels

    def check_capacity(self, clients: int) -> None:
        if clients > self.max_clients():
            raise ValueError(f"{clients} clients' sum of {self.bits}-bit values overflows "
                             f"2^{MOD_BITS}; at most {self.max_clients()} (use fewer bits)")

    def quantize(self, values: np.ndarray, rng: np.random.Generator | None = None
                 ) -> np.ndarray:
        """Integers in 0 .. levels; RangeError when any value is outside [-R, R] or not
        finite. Rounding draws from ``rng``, by default seeded from OS entropy."""
        x = np.asarray(values, dtype=np.float64)
        outside = int(np.count_nonzero(~(np.abs(x) <= self.value_range)))
        if outside:
            raise RangeError(f"{outside} of {x.size} values lie outside the quantization "
                             f"range [-{self.value_range:g}, {self.value_range:g}] (or are "
                             "not finite); they are refused, not clipped")
        rng = rng or np.random.default_rng(secrets.randbits(128))
        scaled = (x + self.value_range) / self.step
        low = np.floor(scaled)
        up = rng.random(x.shape) < (scaled - low)
        return np.minimum(low + up, self.levels).astype(WORD)

    def dequantize_sum(self, total: np.ndarray, clients: int) -> np.ndarray:
        """The float sum of ``clients`` vectors from the sum of their quantised ones."""
        return np.asarray(total, dtype=np.float64) * self.step - clients * self.value_range

    def sum_error_bound(self, clients: int) -> float:
        """|dequantised sum - true sum| per coordinate is below this."""
        return clients * self.step

    def check_sum(self, total: np.ndarray, clients: int) -> None:
        """RangeError unless every coordinate of the unmasked sum of ``clients`` vectors
        is one that many honest vectors can make (0 .. clients * levels, i.e. the
        dequantised sum in [-clients R, clients R]). A client controls its own word mod
        2^32, so this bounds the sum, not its share of it: one client can still move a
        coordinate anywhere inside the range (docs/privacy.md, "Integrity")."""
        outside = int(np.count_nonzero(np.asarray(total, dtype=np.uint64)
                                       > clients * self.levels))
        if outside:
            raise RangeError(f"{outside} of {np.size(total)} coordinates of the unmasked "
                             f"sum of {clients} clients lie outside "
                             f"[-{clients} R, {clients} R] (R = {self.value_range:g}): a "
                             "client sent a value no clipped update quantises to")


# ---- masks ------------------------------------------------------------------------------
def derive_key(secret: bytes, label: str) -> bytes:
    """A 32-byte ChaCha20 key for one purpose (``label``) from an agreed or random secret."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"fedtune secure aggregation: {label}".encode()).derive(secret)


def prg_words(key: bytes, count: int) -> np.ndarray:
    """``count`` uniform 32-bit words: the ChaCha20 keystream of ``key``."""
    if len(key) != 32:
        raise ValueError(f"a mask key has 32 bytes, got {len(key)}")
    stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * count)), dtype=WORD).copy()


def self_mask(seed: bytes, count: int) -> np.ndarray:
    return prg_words(derive_key(seed, "self mask"), count)


def pair_mask(shared: bytes, count: int) -> np.ndarray:
    return prg_words(derive_key(shared, "pairwise mask"), count)


def pair_sign(node: int, other: int) -> int:
    """+1 for the larger node id of a pair, -1 for the smaller: the two masks cancel."""
    if node == other:
        raise ValueError(f"node {node} has no pairwise mask with itself")
    return 1 if node > other else -1


def add_signed(total: np.ndarray, mask: np.ndarray, sign: int) -> np.ndarray:
    """total + sign * mask mod 2^32 (uint32 wraps around)."""
    with np.errstate(over="ignore"):
        return (total + mask) if sign > 0 else (total - mask)


def mask_vector(quantized: np.ndarray, seed: bytes, node: int,
                pair_secrets: dict[int, bytes]) -> np.ndarray:
    """The vector a client sends: quantised values plus its self mask plus its pairwise
    masks with every neighbour in ``pair_secrets`` (node id -> agreed secret)."""
    out = add_signed(quantized.astype(WORD), self_mask(seed, quantized.size), 1)
    for other in sorted(pair_secrets):
        out = add_signed(out, pair_mask(pair_secrets[other], out.size), pair_sign(node, other))
    return out


def modular_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0], dtype=WORD)
    for v in vectors:
        total = add_signed(total, v.astype(WORD), 1)
    return total


# ---- commitments -------------------------------------------------------------------------
def digest(data: bytes) -> bytes:
    """SHA-256 of ``data``: what the owner of a secret publishes about each Shamir share
    it deals (and about its seed), so the server can tell a share a holder made up from
    the one it was given. A share is uniform, so its digest says nothing of the secret."""
    hasher = hashes.Hash(hashes.SHA256())
    hasher.update(bytes(data))
    return hasher.finalize()


def tail_probability(tail: float = NOISE_TAIL) -> float:
    """P(|N(0, 1)| > tail): how often one noised coordinate falls outside the range."""
    return math.erfc(tail / math.sqrt(2))
