"""The seed tree: every random stream of a run, derived from the one ``run.seed``.

A seeded run must be reproducible whichever process, worker or device draws each
number, and no two streams may share a seed (a DP noise draw that equals a training
draw would leak through it). So every seed in fedtune comes from a function here, and
nowhere else is a seed computed::

    run.seed
    ├── round_seed(run, r)                  sent with round r's messages
    │   ├── client_seed(round, partition)    one client's training (batches, dropout)
    │   │   ├── +1 in DP-SGD                 its per-sample noise (fedtune.train.dpsgd)
    │   │   └── client_noise_seed(client)    its share of distributed client-level DP noise
    │   └── server_noise_seed(round)         the server's central client-level DP noise
    ├── lora_init_seed(run, module)          a module's fresh LoRA A (same in every process)
    ├── latent_basis_seed(run, module)       a module's fixed Fed-SB basis (fedsb's B_0)
    ├── stream(run, "faults", r)             simulated dropouts and timings of round r
    ├── stream(run, "eval")                  the fixed subset of clients that evaluates
    ├── stream(run, "generations")           whose held-out prompts the report answers
    └── random.Random(run), one per use      the server's sampling of clients
                                             (``sampler``), the data partition's
                                             shuffles, the profile mix's shuffle

The arithmetic ones keep the formulas of the first releases (so seeded results stay
what they were); they are injective on the ranges a run uses (rounds < 1000,
partitions < 100,003). Under DP the draws the guarantee rests on (client sample,
noise, DP-SGD batches) bypass this tree with OS entropy unless ``privacy.reproducible``.
"""

from __future__ import annotations

import hashlib
import random


def round_seed(run_seed: int, server_round: int) -> int:
    """The seed the server sends with round ``server_round``'s messages."""
    return run_seed * 1000 + server_round


def client_seed(round_seed: int, partition: int) -> int:
    """A client's training seed in a round: reproducible whichever worker runs it."""
    return round_seed * 100_003 + partition


def server_noise_seed(round_seed: int) -> int:
    """The seed of a round's server-side DP noise (apart from every training seed)."""
    return round_seed * 7919 + 104_729


def client_noise_seed(client_seed: int) -> int:
    """The seed of one client's share of distributed DP noise in a round."""
    return client_seed * 31 + 17


def lora_init_seed(run_seed: int, module: str) -> int:
    """Per-module seed so a module's fresh A depends only on (seed, name), not on which
    other modules are adapted."""
    digest = hashlib.sha256(f"{run_seed}/{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def latent_basis_seed(run_seed: int, module: str) -> int:
    """Per-module seed of Fed-SB's fixed basis (``fedtune.core.init.seeded_latent_basis``),
    apart from the module's LoRA A seed (hashed with another label)."""
    digest = hashlib.sha256(f"{run_seed}/{module}/fedsb-basis".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sampler(run_seed: int) -> random.Random:
    """The server's client sampling: one stream for the whole run, kept in checkpoints."""
    return random.Random(run_seed)


def stream(run_seed: int, purpose: str, *path: int) -> random.Random:
    """A named stream of Python randomness (``random.Random`` hashes the text with
    SHA-512, so names never collide with the arithmetic seeds above)."""
    return random.Random(":".join([str(run_seed), *map(str, path), purpose]))
