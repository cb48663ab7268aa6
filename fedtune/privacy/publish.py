"""What a round's record may publish under client-level DP: the mechanism's own numbers
and counts of clients, nothing else.

The epsilon covers the released adapters, not the rest of the run directory, so whatever
else leaves the server must not depend on who was sampled beyond how many (the counts
are published, and say so, see ``wrapper.ClientLevelDPAggregator.report``). A round's
record as the round loop builds it holds more: bytes each way (their total says which
ranks, so which clients, were sampled: payloads have the size of each client's own
rank), durations (a slow client's presence shows in them), and lists of dropped replies
and refused names with their reasons (a refusing client names itself). Those are
withheld; the lists become counts.

A key is published only when it is listed here: a new key, written by any part of the
round loop, stays out of a private run's files until someone decides it is a count or
the mechanism's own number. Pure: no Flower, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: published as they are: counts of clients, the mechanism's numbers, the held-out loss
#: of federated evaluation (the fixed evaluating clients, never the sample; off unless
#: ``privacy.federated_eval`` opts in, and then said not to be covered)
PUBLIC_KEYS = frozenset({
    "round", "train_loss", "eval_loss", "eval_perplexity",
    "clients_sampled", "clients_replied", "stragglers", "dropouts",
    "epsilon", "delta", "noise_multiplier", "dp_noise_std", "dp_noise_to_signal",
    # reproducible experiments only (the wrapper publishes them only then): clipped norms
    "dp_update_norm_mean", "dp_update_norm_max", "dp_clipped_fraction",
    # secure aggregation: its settings and how many clients it lost
    "secagg_dropped", "secagg_bits", "secagg_range", "secagg_sum_error_bound",
    # a failed secure round: that it failed, and which check failed (names no client)
    "secagg_failed", "secagg_failure",
})
#: lists that say who or why, published as how many
COUNTED = {"dropped": "clients_dropped", "refused_names": "names_refused"}
#: the summary's account of what a private run's round records leave out
WITHHELD = ("per round: bytes up and down (a total says which ranks were sampled; each "
            "client's payload size follows from its public rank, see adapter_bytes_by_rank), "
            "durations, and which clients were dropped or refused and why (counts only)")


def private_round(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` as a private run publishes it: the public keys, and the lists of who
    and why replaced by their lengths."""
    published = {k: v for k, v in record.items() if k in PUBLIC_KEYS}
    for key, count in COUNTED.items():
        if key in record:
            published[count] = len(record[key])
    return published


def adapter_bytes_by_rank(modules: Mapping[str, tuple[int, int]], ranks: set[int],
                          fields: tuple[str, ...] = ("A", "B")) -> dict[str, int]:
    """rank -> bytes of one client's LoRA at that rank as dense fp32 (``fields`` of every
    adapted module, ``module -> (in, out)``): what a payload's size follows from, fixed
    by public settings, published instead of per-round totals."""
    def size(rank: int) -> int:
        return 4 * rank * sum(("A" in fields) * size_in + ("B" in fields) * size_out
                              for size_in, size_out in modules.values())
    return {str(rank): size(rank) for rank in sorted(ranks)}
