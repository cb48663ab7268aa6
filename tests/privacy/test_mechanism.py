"""Client-level DP math against independent dense computations, and noise statistics."""

import math

import pytest
import torch

from fedtune.core.adapters import ClientUpdate, LoraFactors
from fedtune.core.lowrank import pad_cols, pad_rows, truncate
from fedtune.privacy.clip import clip_to_norm, product_norm, total_norm
from fedtune.privacy.mechanism import (
    ClientLevelDP,
    dense_release,
    factor_release,
    local_release,
)
from fedtune.privacy.noise import GaussianNoise

OUT, IN = 12, 10


def _factors(rank: int, scale: float, seed: int, size: float = 1.0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(A=torch.randn(rank, IN, generator=g) * size,
                       B=torch.randn(OUT, rank, generator=g) * size, scale=scale)


def _update(start: LoraFactors, seed: int, size: float, client: int) -> ClientUpdate:
    """A client that moved A and B by random amounts of about ``size``."""
    move = _factors(start.rank, start.scale, seed, size)
    final = LoraFactors(A=start.A + move.A, B=start.B + move.B, scale=start.scale)
    return ClientUpdate({"m": final}, num_examples=10 * (client + 1), client_id=str(client),
                        start={"m": start})


def test_clip_bounds_norm_and_leaves_small_contributions_unchanged():
    g = torch.Generator().manual_seed(0)
    big = {"a": torch.randn(30, 7, generator=g), "b": torch.randn(5, generator=g)}
    clipped, norm, factor = clip_to_norm(big, 1.5)
    assert norm == pytest.approx(math.sqrt(sum(float(t.pow(2).sum()) for t in big.values())))
    assert total_norm(clipped) <= 1.5 * (1 + 1e-6)
    assert total_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    assert factor < 1
    for k in big:  # same direction
        torch.testing.assert_close(clipped[k], big[k] * (1.5 / norm))
    small = {k: v * 1e-3 for k, v in big.items()}
    kept, _, factor = clip_to_norm(small, 1.5)
    assert factor == 1.0
    for k in small:
        assert torch.equal(kept[k], small[k])
    with pytest.raises(ValueError, match="clip norm"):
        clip_to_norm(big, 0.0)


def test_product_norm_matches_dense_frobenius():
    pairs = {str(i): (torch.randn(OUT, 3), torch.randn(3, IN)) for i in range(3)}
    dense = math.sqrt(sum(float((B.double() @ A.double()).pow(2).sum())
                          for B, A in pairs.values()))
    assert product_norm(pairs) == pytest.approx(dense, rel=1e-9)


@pytest.mark.parametrize("sampled", [3, 5])  # 5 > 3 replies: the denominator stays m
def test_factor_release_without_noise_is_base_plus_clipped_mean(sampled):
    base = _factors(4, 2.0, 0)
    updates = [_update(base, 10 + k, size, k) for k, size in enumerate((0.01, 1.0, 3.0))]
    C = 0.8
    dp = ClientLevelDP(clip_norm=C, noise_multiplier=0.0, sampled=sampled)
    release = factor_release(updates, {"m": base}, dp, GaussianNoise(0))
    # independent reference: each client's (dA, dB) as one vector, clipped, summed / m
    expected_A, expected_B = base.A.double().clone(), base.B.double().clone()
    for u in updates:
        dA = (u.factors["m"].A - base.A).double()
        dB = (u.factors["m"].B - base.B).double()
        norm = math.sqrt(float(dA.pow(2).sum() + dB.pow(2).sum()))
        f = min(1.0, C / norm)
        expected_A += f * dA / sampled
        expected_B += f * dB / sampled
    out = release.factors["m"]
    torch.testing.assert_close(out.A.double(), expected_A, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.B.double(), expected_B, rtol=0, atol=1e-6)
    assert out.scale == 2.0
    assert release.clipped == 2  # the 0.01 client was under C
    assert release.noise_std == 0.0


def test_factor_release_pads_mixed_ranks_and_scales_in_the_global_frame():
    """zeropad with ranks 2 and 4 (scales alpha / r = 4 and 2): updates are taken in the
    global adapter's frame (scale 1 when they differ) and zero-padded."""
    previous = LoraFactors(A=torch.randn(4, IN), B=torch.randn(OUT, 4), scale=1.0)
    starts = [LoraFactors(A=previous.A[:r], B=previous.B[:, :r] / s, scale=s)
              for r, s in ((2, 4.0), (4, 2.0))]
    updates = [_update(st, 20 + k, 0.05, k) for k, st in enumerate(starts)]
    dp = ClientLevelDP(clip_norm=100.0, noise_multiplier=0.0, sampled=2)
    out = factor_release(updates, {"m": previous}, dp, GaussianNoise(0)).factors["m"]
    dense = previous.delta().double()
    ref_A, ref_B = previous.A.double().clone(), previous.B.double().clone()
    for u, st in zip(updates, starts, strict=True):
        f = u.factors["m"]
        ref_A += pad_rows((f.A - st.A).double(), 4) / 2
        ref_B += pad_cols(((f.B - st.B) * st.scale).double(), 4) / 2
    torch.testing.assert_close(out.A.double(), ref_A, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.B.double(), ref_B, rtol=0, atol=1e-5)
    assert out.scale == 1.0
    assert dense.shape == out.delta().shape


def test_factor_release_for_ffa_keeps_A_and_clips_B_only():
    base = _factors(4, 2.0, 1)
    updates = []
    for k in range(3):
        moved = _factors(4, 2.0, 30 + k)
        final = LoraFactors(A=base.A, B=base.B + moved.B, scale=2.0)
        updates.append(ClientUpdate({"m": final}, 5, str(k), start={"m": base}))
    dp = ClientLevelDP(clip_norm=0.5, noise_multiplier=3.0, sampled=3)
    out = factor_release(updates, {"m": base}, dp, GaussianNoise(0), trainable=("B",))
    assert torch.equal(out.factors["m"].A, base.A)
    assert all(n > 0.5 for n in out.norms)


def test_dense_release_without_noise_is_truncated_clipped_weight_mean():
    previous = LoraFactors(A=torch.randn(3, IN), B=torch.randn(OUT, 3), scale=1.0)
    fresh = [LoraFactors(A=torch.randn(r, IN), B=torch.zeros(OUT, r), scale=s)
             for r, s in ((2, 4.0), (4, 2.0), (4, 2.0))]
    updates = [_update(st, 40 + k, size, k) for k, (st, size) in
               enumerate(zip(fresh, (0.01, 1.0, 2.0), strict=True))]
    C, m = 1.0, 4
    dp = ClientLevelDP(clip_norm=C, noise_multiplier=0.0, sampled=m)
    release = dense_release(updates, {"m": previous}, dp, GaussianNoise(0), rank=IN)
    total = previous.delta().double()
    for u, st in zip(updates, fresh, strict=True):
        dW = (u.factors["m"].delta() - st.delta()).double()
        total += dW * min(1.0, C / float(dW.norm())) / m
    torch.testing.assert_close(release.factors["m"].delta().double(), total, rtol=0, atol=1e-5)
    # and at a smaller rank: the best rank-3 approximation of the same matrix
    low = dense_release(updates, {"m": previous}, dp, GaussianNoise(0), rank=3)
    best = truncate(total, torch.eye(IN, dtype=torch.float64), 3)
    torch.testing.assert_close(low.factors["m"].delta().double(), best.B @ best.A,
                               rtol=0, atol=1e-5)


def _zero_updates(rank: int, clients: int) -> tuple[LoraFactors, list[ClientUpdate]]:
    base = LoraFactors(A=torch.zeros(rank, 400), B=torch.zeros(300, rank), scale=1.0)
    return base, [ClientUpdate({"m": base}, 1, str(k), start={"m": base})
                  for k in range(clients)]


@pytest.mark.parametrize("secure", [False, True])
def test_noise_is_zero_mean_with_std_z_C_over_m(secure):
    z, C, m = 1.3, 0.7, 5
    base, updates = _zero_updates(8, 4)
    dp = ClientLevelDP(clip_norm=C, noise_multiplier=z, sampled=m)
    draws = []
    for seed in range(20):
        noise = GaussianNoise(None if secure else seed)
        out = factor_release(updates, {"m": base}, dp, noise).factors["m"]
        draws += [out.A.flatten(), out.B.flatten()]
    samples = torch.cat(draws).double()
    n, sigma = samples.numel(), z * C / m
    release = factor_release(updates, {"m": base}, dp, GaussianNoise(0))
    assert release.released == 8 * 400 + 300 * 8
    assert release.noise_to_signal(C) == pytest.approx(z * math.sqrt(8 * 700) / m)
    assert dp.noise_std == pytest.approx(sigma)
    # standard error of the std estimate is sigma / sqrt(2n); allow 5 of them
    assert float(samples.std()) == pytest.approx(sigma, abs=5 * sigma / math.sqrt(2 * n))
    assert abs(float(samples.mean())) < 5 * sigma / math.sqrt(n)
    kurtosis = float(((samples - samples.mean()) ** 4).mean() / samples.var() ** 2)
    assert kurtosis == pytest.approx(3.0, abs=0.1)  # Gaussian tails, not uniform


def test_dense_noise_std_and_seeded_reproducibility():
    z, C, m = 2.0, 0.5, 4
    base, updates = _zero_updates(2, 2)
    dp = ClientLevelDP(clip_norm=C, noise_multiplier=z, sampled=m)
    first = dense_release(updates, None, dp, GaussianNoise(7), rank=300).factors["m"].delta()
    again = dense_release(updates, None, dp, GaussianNoise(7), rank=300).factors["m"].delta()
    other = dense_release(updates, None, dp, GaussianNoise(8), rank=300).factors["m"].delta()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    sigma = z * C / m
    n = first.numel()
    assert float(first.double().std()) == pytest.approx(sigma, abs=5 * sigma / math.sqrt(2 * n))


def test_secure_noise_is_not_reproducible():
    a = GaussianNoise(None).sample((1000,), 1.0)
    b = GaussianNoise(None).sample((1000,), 1.0)
    assert GaussianNoise(None).secure and not GaussianNoise(3).secure
    assert not torch.equal(a, b)


def test_local_release_clips_then_adds_the_share():
    g = torch.Generator().manual_seed(3)
    delta = {"x.lora_B.weight": torch.randn(50, 4, generator=g) * 3}
    clipped, _ = local_release(delta, 1.0, 0.0, GaussianNoise(0))
    assert total_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    noisy, norm = local_release(delta, 1.0, 0.2, GaussianNoise(0))
    assert norm == pytest.approx(total_norm(delta))
    residual = (noisy["x.lora_B.weight"] - clipped["x.lora_B.weight"]).double()
    assert float(residual.std()) == pytest.approx(0.2, rel=0.15)


def test_missing_start_is_an_error():
    base = _factors(2, 1.0, 0)
    update = ClientUpdate({"m": base}, 1, "0")
    dp = ClientLevelDP(clip_norm=1.0, noise_multiplier=1.0, sampled=1)
    with pytest.raises(ValueError, match="needs the start"):
        factor_release([update], {"m": base}, dp, GaussianNoise(0))
    with pytest.raises(ValueError, match="needs its base"):
        factor_release([], None, dp, GaussianNoise(0))


def _population_release(ranks, base, sampled, z=0.0, seed=0):
    """The factor release of clients of ``ranks`` (each started at its slice of
    ``base``, moved by about 1), expected cohort ``sampled``, clip 0.5."""
    updates = [_update(LoraFactors(A=base.A[:r], B=base.B[:, :r], scale=base.scale),
                       40 + k, 1.0, k) for k, r in enumerate(ranks)]
    dp = ClientLevelDP(clip_norm=0.5, noise_multiplier=z, sampled=sampled)
    return factor_release(updates, {"m": base}, dp, GaussianNoise(seed))


def test_the_release_has_the_populations_shape_whoever_was_sampled():
    """A population of ranks (2, 2, 2, 8): whether the rank-8 client was sampled or not,
    or nobody, the release is rank 8 (the base's) with the same number of noised
    entries; the padding is zeros (without noise, rows the sampled clients lack stay
    the base's), and the noise covers every entry of that shape (std z C / m on rows
    no sampled client has). The round loop makes the base of round 1 the seeded start
    at the population's largest rank (tests/flower/test_secret_cohort.py), where the
    release used to be widened to the widest client sampled."""
    base = _factors(8, 2.0, 5)
    samples = [[], [2], [2, 2], [2, 8], [8], [2, 2, 2, 8]]
    releases = [_population_release(s, base, sampled=2) for s in samples]
    for release in releases:
        out = release.factors["m"]
        assert (out.A.shape, out.B.shape, out.scale) == ((8, IN), (OUT, 8), 2.0)
        assert release.released == 8 * (IN + OUT)
    narrow = releases[2].factors["m"]  # only rank-2 clients: padding is zeros
    assert torch.equal(narrow.A[2:], base.A[2:]) and torch.equal(narrow.B[:, 2:], base.B[:, 2:])
    assert not torch.equal(narrow.A[:2], base.A[:2])
    z, m = 4.0, 2
    noisy = _population_release([2, 2], base, sampled=m, z=z, seed=3).factors["m"]
    residual = torch.cat([(noisy.A[2:] - base.A[2:]).flatten(),
                          (noisy.B[:, 2:] - base.B[:, 2:]).flatten()]).double()
    assert float(residual.std()) == pytest.approx(z * 0.5 / m, rel=0.12)


def test_a_client_of_the_population_moves_the_padded_sum_by_at_most_C():
    """Sensitivity stays C at the population's shape: adding the rank-8 client to a
    cohort of rank-2 clients moves the (noise-free) release by at most C / m; zero
    padding adds nothing to a client's norm."""
    base = _factors(8, 2.0, 6)
    without = _population_release([2, 2], base, sampled=3).factors["m"]
    with_wide = _population_release([2, 2, 8], base, sampled=3).factors["m"]
    moved = math.sqrt(float((with_wide.A - without.A).double().pow(2).sum()
                            + (with_wide.B - without.B).double().pow(2).sum()))
    assert moved <= 0.5 / 3 * (1 + 1e-5)
    assert moved == pytest.approx(0.5 / 3, rel=1e-4)  # it moved by about 1: clipped to C


def test_an_update_wider_than_the_release_is_refused():
    base = _factors(2, 2.0, 7)
    wide = _update(_factors(4, 2.0, 8), 9, 0.1, 0)
    with pytest.raises(ValueError, match="above the release's rank 2"):
        factor_release([wide], {"m": base}, ClientLevelDP(1.0, 1.0, 1), GaussianNoise(0))
