"""FID: the Fréchet distance against pytorch-fid's scipy formula and known answers, streamed
float32 statistics against float64 references (offsets, masks, sharding), statistics files."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from scm_jax.eval import feature_stats, fid
from scm_jax.sharding import batch_sharding, make_mesh


def scipy_reference(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's ``calculate_frechet_distance``: sqrtm of S1 S2, real part (float64)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def inception_like(seed: int, n: int, d: int, offset: float = 0.0) -> np.ndarray:
    """(n, d) float32 features like pool3's: non-negative, mean ~0.4, correlated (64 factors)."""
    r = np.random.default_rng(seed)
    w = np.random.default_rng(1234).standard_normal((64, d)) * 0.15
    h = r.standard_normal((n, 64)) @ w + 0.2 * r.standard_normal((n, d)) + 0.35 + offset
    return np.abs(h).astype(np.float32)


def random_stats(seed: int, d: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    return fid.stats_from_features(r.standard_normal((n, d)) @ r.standard_normal((d, d)) + 1.0)


def test_frechet_distance_matches_scipy_sqrtm_within_1e_6():
    for d in (1, 16, 48):
        a, b = random_stats(0, d), random_stats(1, d)
        ref = scipy_reference(*a, *b)
        assert fid.frechet_distance(*a, *b) == pytest.approx(ref, rel=1e-6)
        assert fid.frechet_distance(*b, *a) == pytest.approx(ref, rel=1e-6)  # symmetric


def check_fid_of_two_feature_sets(n: int, d: int) -> None:
    a, b = inception_like(1, n, d), inception_like(2, n, d, offset=0.05)
    ref = scipy_reference(*fid.stats_from_features(a), *fid.stats_from_features(b))
    streamed = []
    for x in (a, b):  # float32 accumulation in batches of 500 (the default without x64)
        stats = feature_stats.init(d)
        for i in range(0, n, 500):
            stats = feature_stats.update(stats, jnp.asarray(x[i : i + 500]))
        assert stats.sum.dtype == jnp.float32
        streamed.append(feature_stats.finalize(stats)[:2])
    value = fid.frechet_distance(*streamed[0], *streamed[1])
    print(f"d={d} n={n}: FID {value:.6f}, scipy float64 reference {ref:.6f}, "
          f"relative difference {abs(value - ref) / ref:.2e}")  # fmt: skip
    assert value == pytest.approx(ref, rel=5e-3)  # the must-show: within 0.5%
    assert value == pytest.approx(ref, rel=1e-4)  # measured: ~1e-8


def test_fid_of_two_feature_sets_matches_reference_within_half_percent():
    """Streamed float32 statistics + eigen route vs float64 stats + scipy sqrtm: within 0.5%."""
    check_fid_of_two_feature_sets(n=3000, d=256)


@pytest.mark.slow
def test_fid_of_two_2048d_feature_sets_matches_reference_within_half_percent():
    """The same at Inception's 2048 dimensions (two deterministic sets of 3000 rows)."""
    check_fid_of_two_feature_sets(n=3000, d=2048)


def test_near_singular_statistics_have_known_answers():
    """N < D samples (rank-deficient covariances): finite, >= 0, and the known values."""
    d, n = 64, 20
    x = np.random.default_rng(0).standard_normal((n, d)) * 3.0 + 0.5
    mu, sigma = fid.stats_from_features(x)
    assert np.linalg.matrix_rank(sigma) == n - 1
    tol = 1e-6 * np.trace(sigma)
    assert 0.0 <= fid.frechet_distance(mu, sigma, mu, sigma) <= tol
    delta = np.linspace(-1, 1, d)
    mu2, sigma2 = fid.stats_from_features(x + delta)
    assert fid.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(delta @ delta, abs=tol)
    # Rank-deficient covariances with a common eigenbasis Q: tr sqrt(S1 S2) = sum sqrt(a b).
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((d, d)))
    ev1, ev2 = np.zeros(d), np.zeros(d)
    ev1[:40], ev2[20:] = np.linspace(1, 5, 40), np.linspace(0.5, 2, d - 20)
    s1, s2 = (q * ev1) @ q.T, (q * ev2) @ q.T
    want = ev1.sum() + ev2.sum() - 2 * np.sqrt(ev1 * ev2).sum()
    got = fid.frechet_distance(np.zeros(d), s1, np.ones(d), s2)
    assert got == pytest.approx(want + d, rel=1e-9)


def test_frechet_distance_rejects_bad_inputs():
    a, b = random_stats(0, 16), random_stats(0, 8)
    with pytest.raises(ValueError, match="statistics of 16-d features vs 8-d"):
        fid.frechet_distance(*a, *b)
    with pytest.raises(ValueError, match="expected mu"):
        fid.frechet_distance(a[0], a[1][:4], *a)
    bad = a[1].copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fid.frechet_distance(a[0], bad, *a)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        fid.frechet_distance(a[0], -a[1], *a)


def padded_batches(x: np.ndarray, sizes: list[int], batch: int):
    """Uneven chunks of ``x``, each padded with NaN rows to ``batch`` rows, and their masks."""
    start = 0
    for size in sizes:
        rows = np.full((batch, x.shape[1]), np.nan, np.float32)
        rows[:size] = x[start : start + size]
        yield jnp.asarray(rows), jnp.asarray(np.arange(batch) < size)
        start += size


def test_streaming_with_masked_padding_equals_float64_reference():
    x = inception_like(0, 250, 16)
    sizes = [0, 64, 13, 64, 1, 60, 48]  # an empty batch first (sets no shift), then uneven ones
    assert sum(sizes) == len(x)
    stats = feature_stats.init(16)
    compiled = feature_stats.update._cache_size()
    for rows, mask in padded_batches(x, sizes, 64):
        stats = feature_stats.update(stats, rows, mask)
    assert (
        feature_stats.update._cache_size() == compiled + 1
    )  # one fixed batch shape: compiled once
    mu, sigma, n = feature_stats.finalize(stats)
    ref_mu, ref_sigma = fid.stats_from_features(x)
    assert n == 250 and mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-6)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-5, atol=1e-6 * np.abs(ref_sigma).max())
    np.testing.assert_allclose(ref_sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats.finalize(feature_stats.update(feature_stats.init(16), jnp.asarray(x[:1])))
    with pytest.raises(ValueError, match="non-finite"):
        feature_stats.finalize(
            feature_stats.update(
                feature_stats.init(16), jnp.asarray(np.full((4, 16), np.inf, np.float32))
            )
        )
    with pytest.raises(ValueError, match=r"expected features \(B, 16\)"):
        feature_stats.update(stats, jnp.zeros((4, 8)))


def test_float32_shifted_accumulation_keeps_large_offsets_precise():
    """Mean 100, std ~1: naive float32 sums of x x^T lose ~4 digits; the shifted sums keep them."""
    d, n = 64, 20000
    r = np.random.default_rng(0)
    x = (100 + r.standard_normal((n, d)) @ (np.eye(d) + 0.1 * r.standard_normal((d, d)))).astype(
        np.float32
    )
    ref_mu, ref_sigma = fid.stats_from_features(x)
    stats = feature_stats.init(d)
    for i in range(0, n, 2000):
        stats = feature_stats.update(stats, jnp.asarray(x[i : i + 2000]))
    mu, sigma, _ = feature_stats.finalize(stats)
    xj = jnp.asarray(x)
    s1 = np.asarray(xj.sum(0), np.float64)
    s2 = np.asarray(jnp.einsum("bi,bj->ij", xj, xj, precision="highest"), np.float64)
    naive = (s2 - np.outer(s1, s1) / n) / (n - 1)
    err = lambda s: np.abs(s - ref_sigma).max() / np.abs(ref_sigma).max()
    print(f"max relative covariance error: shifted {err(sigma):.1e}, naive {err(naive):.1e}")
    assert err(naive) > 1e-4  # measured ~1e-3
    assert err(sigma) < 2e-6  # measured ~1e-7
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-7)


def test_float64_accumulation_with_x64(x64):
    x = inception_like(3, 100, 8).astype(np.float64)
    stats = feature_stats.update(feature_stats.init(8), jnp.asarray(x))
    assert stats.sum_outer.dtype == jnp.float64
    mu, sigma, _ = feature_stats.finalize(stats)
    ref_mu, ref_sigma = fid.stats_from_features(x)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-13)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("mesh_kind", ["1d", "project"])
def test_sharded_update_equals_unsharded(mesh_kind):
    """Features split over 8 CPU devices along the batch; statistics stay replicated."""
    if mesh_kind == "1d":
        mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
        sharding = NamedSharding(mesh, PartitionSpec("batch"))
    else:
        mesh = make_mesh(data=2, fsdp=4)
        sharding = batch_sharding(mesh)
    x = inception_like(5, 200, 32)
    sizes = [64, 64, 50, 22]
    sharded, plain = feature_stats.init(32, mesh=mesh), feature_stats.init(32)
    for rows, mask in padded_batches(x, sizes, 64):
        rows, smask = jax.device_put(rows, sharding), jax.device_put(mask, sharding)
        assert len(rows.sharding.device_set) == 8
        sharded = feature_stats.update(sharded, rows, smask)
        plain = feature_stats.update(plain, jax.device_put(rows, jax.devices()[0]), mask)
    for leaf in jax.tree.leaves(sharded):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    (mu_s, sigma_s, n_s), (mu_p, sigma_p, n_p) = (
        feature_stats.finalize(sharded),
        feature_stats.finalize(plain),
    )
    assert n_s == n_p == 200
    np.testing.assert_allclose(mu_s, mu_p, rtol=1e-6)
    np.testing.assert_allclose(sigma_s, sigma_p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma_s, fid.stats_from_features(x)[1], rtol=1e-5, atol=1e-7)


def test_stats_file_round_trip_and_compatibility(tmp_path):
    a, b = random_stats(0, 16), random_stats(1, 16)
    info = {"variant": "torchscript-stylegan3", "source_sha256": "ab" * 32}
    meta = fid.inception_meta(info, "tf1-bilinear", "test set A", input_convention="tf")
    path_a = fid.save_stats(tmp_path / "sub" / "a.npz", *a, 200, meta)
    mu, sigma, n, loaded = fid.load_stats(path_a)
    np.testing.assert_array_equal(mu, a[0])
    np.testing.assert_array_equal(sigma, a[1])
    assert n == 200 and loaded["path"] == str(path_a) and loaded["format"] == fid.STATS_FORMAT
    assert {k: loaded[k] for k in meta} == meta
    path_b = fid.save_stats(tmp_path / "b.npz", *b, 200, meta)
    value, notes = fid.fid_from_stats(path_a, path_b)
    assert notes == [] and value == pytest.approx(fid.frechet_distance(*a, *b), rel=1e-12)
    # A different resize or weights variant: reported, not silent; the value is still computed.
    other = dict(meta, resize="torch-bilinear", weights_variant="pytorch-fid")
    with pytest.warns(UserWarning) as record:
        value2, notes = fid.fid_from_stats(path_a, (*b, 200, other))
    assert value2 == pytest.approx(value) and len(notes) == 2
    assert [str(w.message) for w in record] == notes
    assert "weights_variant differs" in notes[0] and "second statistics" in notes[1]
    # A foreign reference file (pytorch-fid / clean-fid: mu and sigma only) loads, reported.
    np.savez(tmp_path / "foreign.npz", mu=b[0].astype(np.float32), sigma=b[1])
    _, _, n_f, meta_f = fid.load_stats(tmp_path / "foreign.npz")
    assert n_f is None and set(meta_f) == {"path"}
    _, notes = fid.fid_from_stats(path_a, tmp_path / "foreign.npz", warn=False)
    assert notes and all("foreign.npz" in note for note in notes)
    # Few samples: the covariance is singular; reported.
    _, notes = fid.fid_from_stats((*a, 10, meta), path_b, warn=False)
    assert notes == ["first statistics: 10 samples for 16-d features: the covariance is "
                     "singular and the FID is biased upwards (use >= 10k samples; 50k is "
                     "standard)"]  # fmt: skip


def test_stats_file_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"\x00not a zip file" * 10)
    with pytest.raises(ValueError, match=r"corrupt\.npz is not an \.npz"):
        fid.load_stats(corrupt)
    truncated = tmp_path / "truncated.npz"
    fid.save_stats(truncated, *random_stats(0, 16), 200, {})
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated\.npz"):
        fid.load_stats(truncated)
    np.savez(tmp_path / "weights.npz", kernel=np.zeros(3))
    with pytest.raises(ValueError, match=r"weights\.npz is not a file of FID statistics"):
        fid.load_stats(tmp_path / "weights.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(16), sigma=np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"shapes\.npz: expected mu \(D,\) and sigma \(D, D\)"):
        fid.load_stats(tmp_path / "shapes.npz")
    np.savez(tmp_path / "meta.npz", mu=np.zeros(2), sigma=np.eye(2), __meta__=np.array("{oops"))
    with pytest.raises(ValueError, match=r"meta\.npz: unreadable"):
        fid.load_stats(tmp_path / "meta.npz")
    newer = json.dumps({"format": fid.STATS_FORMAT, "format_version": 99})
    np.savez(tmp_path / "new.npz", mu=np.zeros(2), sigma=np.eye(2), __meta__=np.array(newer))
    with pytest.raises(ValueError, match="newer than this scm-jax reads"):
        fid.load_stats(tmp_path / "new.npz")
    with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
        fid.load_stats(tmp_path / "missing.npz")
    big = fid.save_stats(tmp_path / "big.npz", *random_stats(0, 16), 200, {})
    small = fid.save_stats(tmp_path / "small.npz", *random_stats(0, 8), 200, {})
    with pytest.raises(ValueError, match=r"16-d features \(.*big\.npz\) vs 8-d \(.*small\.npz\)"):
        fid.fid_from_stats(big, small)
