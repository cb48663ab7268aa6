"""Robust aggregation in factored form vs the same algorithm on dense flattened updates.

One round of geomedian (smoothed Weiszfeld / RFA) and multi-Krum over ``--clients``
LoRA updates of rank ``--rank`` on ``--modules`` out x in modules. fedtune works on the
K x K Gram matrix of the updates (``core.lowrank.product_gram``) and recompresses the
result to ``--budget`` (flora's stack + thin QR + core SVD); the dense baseline forms
every client's out x in update, flattens the whole adapter into one vector per client
(as Flower's Krum / MultiKrum do with ``np.concatenate(...).ravel()``) and runs the same
algorithm there (distances as ``||x||^2 + ||y||^2 - 2 x.y``, as Flower's
``compute_distances``), ending with the dense aggregate (no recompression: the
baseline is spared its SVD). Both in one process on the same factors; medians over
``--repeats``. Also reports how far the factored combination sum_k beta_k D_k (before
recompression) is from the dense result, and the recompression's relative error.

    python benchmarks/bench_robust.py --threads 1     # 10 clients x r16, 2048 x 2048
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from fedtune.aggregation import get_aggregator
from fedtune.core.adapters import ClientUpdate, LoraFactors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=2048)
    parser.add_argument("--in", dest="in_", type=int, default=2048)
    parser.add_argument("--modules", type=int, default=1)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_updates(args: argparse.Namespace) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(args.seed)
    updates = []
    for k in range(args.clients):
        factors = {f"m{i}": LoraFactors(A=torch.randn(args.rank, args.in_, generator=gen),
                                        B=0.01 * torch.randn(args.out, args.rank, generator=gen),
                                        scale=2.0)
                   for i in range(args.modules)}
        updates.append(ClientUpdate(factors, num_examples=10 + k, client_id=str(k)))
    return updates


def flattened(updates: list[ClientUpdate]) -> Tensor:
    """[K, modules * out * in]: each client's dense update, every module, one row."""
    return torch.stack([torch.cat([f.delta().flatten() for _, f in sorted(u.factors.items())])
                        for u in updates])


def weights(updates: list[ClientUpdate]) -> Tensor:
    n = torch.tensor([float(u.num_examples) for u in updates])
    return n / n.sum()


def dense_geomedian(updates: list[ClientUpdate], smoothing: float = 1e-6,
                    iterations: int = 100, tolerance: float = 1e-8) -> Tensor:
    points, p = flattened(updates), weights(updates)
    z = p @ points
    for _ in range(iterations):
        w = p / (points - z).norm(dim=1).clamp_min(smoothing)
        new = (w / w.sum()) @ points
        moved = (new - z).norm()
        z = new
        if moved <= tolerance * z.norm():
            break
    return z


def dense_multikrum(updates: list[ClientUpdate], byzantine: int = 1) -> Tensor:
    points, p = flattened(updates), weights(updates)
    norms = points.pow(2).sum(dim=1)
    distances = norms[:, None] + norms[None, :] - 2 * points @ points.T
    n = len(updates)
    distances.fill_diagonal_(float("inf"))
    scores = distances.sort(dim=1).values[:, : max(1, n - byzantine - 2)].sum(dim=1)
    chosen = sorted(sorted(range(n), key=lambda k: (float(scores[k]), k))[: n - byzantine])
    q = p[chosen] / p[chosen].sum()
    return q @ points[chosen]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    updates = make_updates(args)
    print(f"{args.clients} clients x rank {args.rank}, {args.modules} module(s) of "
          f"{args.out} x {args.in_}, budget {args.budget}, torch threads "
          f"{torch.get_num_threads()}, median of {args.repeats}")
    print("| method | factored ms | dense flattened ms | speed-up | rel. difference of "
          "the combination | truncation to the budget |")
    print("|---|---|---|---|---|---|")
    for name, dense in (("geomedian", dense_geomedian), ("multikrum", dense_multikrum)):
        aggregator = get_aggregator(name, rank_budget=args.budget)
        fast, adapter = timed(lambda a=aggregator: a.aggregate(updates, None), args.repeats)
        slow, reference = timed(lambda d=dense: d(updates), args.repeats)
        del adapter
        beta = torch.tensor(aggregator.last_coefficients)  # type: ignore[attr-defined]
        exact = beta.float() @ flattened(updates)  # the combination before recompression
        diff = float((exact.double() - reference.double()).norm()  # type: ignore[union-attr]
                     / reference.double().norm())  # type: ignore[union-attr]
        cut = aggregator.metrics()["truncation_error_max"]
        print(f"| {name} | {fast * 1e3:.1f} | {slow * 1e3:.1f} | {slow / fast:.1f}x | "
              f"{diff:.1e} | {cut:.3f} |")


if __name__ == "__main__":
    main()
