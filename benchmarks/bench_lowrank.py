"""Factored vs dense recompression of a stacked LoRA aggregate.

The server's per-round job (flora / flexlora) is: W = sum_k p_k s_k B_k A_k, then the
best rank-``budget`` factors of W. fedtune does it on the stacked factors (thin QR +
SVD of an R x R core); the dense baseline forms the out x in W and calls
torch.linalg.svd on it, as FlexLoRA's reference code does. Both run in the same
process on the same factors; the table reports medians over ``--repeats`` runs.

    python benchmarks/bench_lowrank.py            # out = in = 2048, 10 clients x r16, budget 64
    python benchmarks/bench_lowrank.py --threads 1   # stable timings on a shared machine

On a machine whose cores are busy with other work, multi-threaded BLAS/LAPACK timings
swing wildly (oversubscribed OpenMP threads); ``--threads 1`` gives steady numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from fedtune.core.adapters import LoraFactors
from fedtune.core.lowrank import factored_svd, stack, truncate

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=2048, help="out_features")
    parser.add_argument("--in", dest="in_", type=int, default=2048, help="in_features")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16, help="each client's LoRA rank")
    parser.add_argument("--budget", type=int, default=64, help="rank kept after recompression")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per method")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return parser.parse_args(argv)


def make_clients(args: argparse.Namespace) -> tuple[list[LoraFactors], list[float]]:
    """Random client factors (peft-like scale alpha / r = 2) and example weights p_k."""
    gen = torch.Generator().manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    factors = [
        LoraFactors(
            A=torch.randn(args.rank, args.in_, generator=gen).to(dtype) / args.in_**0.5,
            B=torch.randn(args.out, args.rank, generator=gen).to(dtype) / args.rank**0.5,
            scale=2.0,
        )
        for _ in range(args.clients)
    ]
    factors = [
        LoraFactors(A=f.A.to(args.device), B=f.B.to(args.device), scale=f.scale) for f in factors
    ]
    examples = torch.randint(50, 500, (args.clients,), generator=gen).tolist()
    return factors, [n / sum(examples) for n in examples]


def factored_recompress(factors: list[LoraFactors], weights: list[float], budget: int):
    B, A = stack(factors, weights)
    return truncate(B, A, budget)


def factored_spectrum(factors: list[LoraFactors], weights: list[float]) -> Tensor:
    B, A = stack(factors, weights)
    return factored_svd(B, A)[1]


def max_relative_difference(x: Tensor, reference: Tensor) -> float:
    return float(((x.double() - reference.double()).abs() / reference.double()).max())


def dense_product(factors: list[LoraFactors], weights: list[float]) -> Tensor:
    B, A = stack(factors, weights)
    return B @ A


def dense_recompress(factors: list[LoraFactors], weights: list[float], budget: int):
    U, S, Vh = torch.linalg.svd(dense_product(factors, weights), full_matrices=False)
    root = S[:budget].sqrt()
    return U[:, :budget] * root, root[:, None] * Vh[:budget], S


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def round_robin_timings(
    fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu"
) -> dict[str, tuple[float, float]]:
    """(median, min) wall seconds per method after one warm-up call each.

    The methods take turns within every repeat, so background load hits all of them
    alike and the ratios stay meaningful on a busy machine.
    """
    times: dict[str, list[float]] = {label: [] for label in fns}
    for fn in fns.values():
        fn()
    _sync(device)
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[label].append(time.perf_counter() - start)
    return {label: (statistics.median(t), min(t)) for label, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    factors, weights = make_clients(args)
    stacked_rank = args.clients * args.rank

    dense_label = "dense recompress (form W + linalg.svd)"
    timings = round_robin_timings(
        {
            "factored recompress (stack+QR+core SVD)": lambda: factored_recompress(
                factors, weights, args.budget
            ),
            "factored SVD only (factored_svd)": lambda: factored_spectrum(factors, weights),
            dense_label: lambda: dense_recompress(factors, weights, args.budget),
        },
        args.repeats,
        args.device,
    )

    fact = factored_recompress(factors, weights, args.budget)
    s_fact = factored_spectrum(factors, weights).double()
    _, _, s_dense = dense_recompress(factors, weights, args.budget)
    s_dense = s_dense.double()
    k = args.budget
    sv_diff = max_relative_difference(s_fact[:k], s_dense[:k])
    s_ref = torch.linalg.svdvals(dense_product(factors, weights).double())  # float64 reference
    fact_vs_ref = max_relative_difference(s_fact[:k], s_ref[:k])
    dense_vs_ref = max_relative_difference(s_dense[:k], s_ref[:k])
    dense_error = float(s_dense[k:].norm() / s_dense.norm())

    print(f"W: {args.out} x {args.in_}, {args.clients} clients x rank {args.rank} "
          f"(stacked rank {stacked_rank}), budget {k}, {args.dtype} on {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'method':<42} {'median ms':>10} {'min ms':>10}")
    for label, (med, best) in timings.items():
        print(f"{label:<42} {med * 1e3:>10.2f} {best * 1e3:>10.2f}")
    dense_med = timings[dense_label][0]
    print()
    for label, (med, _) in list(timings.items())[:2]:
        print(f"speed-up of {label}: {dense_med / med:.1f}x")
    print(f"max relative difference of top-{k} singular values, factored vs dense: "
          f"{sv_diff:.2e}")
    print(f"  against a float64 dense SVD: factored {fact_vs_ref:.2e}, "
          f"dense {args.dtype} {dense_vs_ref:.2e}")
    print(f"relative truncation error: factored {fact.relative_error:.6f}, "
          f"dense {dense_error:.6f}")


if __name__ == "__main__":
    main()
