"""Gaussian-mixture toy data, its exact TrigFlow teacher and flow map, and the sample metrics."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import gmm
from scm_jax import trigflow as tf
from scm_jax.guidance import guided_F
from scm_jax.toy import metrics

SIGMA_D = 0.5
# Asymmetric weights and stds, non-zero mean, data std 0.39 != sigma_d: nothing cancels by symmetry.
MIX = gmm.GaussianMixture(
    means=[[0.6, 0.0], [-0.3, 0.4], [0.0, -0.5]], stds=[0.1, 0.2, 0.15], weights=[0.5, 0.3, 0.2]
)


def _rng_x(n, seed=0, scale=0.6, dim=2):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, dim)) * scale)


def _rng_t(n, seed=1, lo=0.05, hi=math.pi / 2 - 0.05):
    return jnp.asarray(np.random.default_rng(seed).uniform(lo, hi, size=n))


def test_mixture_validation():
    with pytest.raises(ValueError, match=r"shape \(K, D\)"):
        gmm.GaussianMixture(means=[0.0, 1.0], stds=[0.1, 0.1], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"stds must have shape \(2,\)"):
        gmm.GaussianMixture(means=[[0.0], [1.0]], stds=[0.1], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"> 0; got \[0.1, -0.2\]"):
        gmm.GaussianMixture(means=[[0.0], [1.0]], stds=[0.1, -0.2], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"sum to 1; got sum 0.9"):
        gmm.GaussianMixture(means=[[0.0], [1.0]], stds=[0.1, 0.2], weights=[0.5, 0.4])
    with pytest.raises(ValueError, match="unknown GaussianMixture key"):
        gmm.GaussianMixture.from_dict({**MIX.to_dict(), "extra": 1})


def test_dict_round_trip_hashable_and_ring():
    d = json.loads(json.dumps(MIX.to_dict()))
    assert gmm.GaussianMixture.from_dict(d) == MIX
    assert hash(gmm.GaussianMixture.from_dict(d)) == hash(MIX)
    assert (MIX.dim, MIX.num_components) == (2, 3)
    ring = gmm.ring_mixture()
    assert (ring.dim, ring.num_components) == (2, 8)
    np.testing.assert_allclose(ring.mean(), 0.0, atol=1e-15)
    np.testing.assert_allclose(ring.cov(), (0.65**2 / 2 + 0.15**2) * np.eye(2), atol=1e-15)
    assert ring.data_std() == pytest.approx(0.4835, abs=1e-4)  # close to sigma_d = 0.5
    np.testing.assert_allclose(np.linalg.norm(ring.means, axis=1), 0.65)
    ring4 = gmm.ring_mixture(4, dim=3)
    np.testing.assert_allclose(np.asarray(ring4.means)[:, 2], 0.0)


def test_sample_moments_match_exact(x64):
    n = 200_000
    x0, k = MIX.sample_with_components(jax.random.key(0), n, jnp.float64)
    assert x0.shape == (n, 2) and x0.dtype == jnp.float64 and k.dtype == jnp.int32
    x0 = np.asarray(x0)
    # Standard errors: sqrt(var / n) ~ 1e-3 for the mean, ~5e-4 for the covariance entries.
    np.testing.assert_allclose(x0.mean(0), MIX.mean(), atol=5e-3)
    np.testing.assert_allclose(np.cov(x0.T), MIX.cov(), atol=4e-3)
    np.testing.assert_allclose(np.bincount(np.asarray(k)) / n, MIX.weights, atol=5e-3)
    assert MIX.sample(jax.random.key(0), 5).dtype == jnp.float32


def test_posterior_endpoints(x64):
    x = _rng_x(64)
    zero, half_pi = jnp.zeros(64), jnp.full(64, math.pi / 2)
    np.testing.assert_allclose(gmm.posterior_x0(MIX, x, zero, SIGMA_D), x, atol=1e-13)
    np.testing.assert_allclose(gmm.posterior_z(MIX, x, zero, SIGMA_D), 0.0, atol=1e-13)
    np.testing.assert_allclose(gmm.velocity(MIX, x, zero, SIGMA_D), 0.0, atol=1e-13)
    e_x0 = gmm.posterior_x0(MIX, x, half_pi, SIGMA_D)  # x_t = z carries no information on x0
    np.testing.assert_allclose(e_x0, np.broadcast_to(MIX.mean(), x.shape), atol=1e-13)
    np.testing.assert_allclose(gmm.posterior_z(MIX, x, half_pi, SIGMA_D), x, atol=1e-13)
    np.testing.assert_allclose(gmm.velocity(MIX, x, math.pi / 2, SIGMA_D), -e_x0, atol=1e-13)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(64,\); got \(3,\)"):
        gmm.velocity(MIX, x, jnp.zeros(3), SIGMA_D)
    far = 50.0 * x  # responsibilities far in the tails: log-sum-exp keeps everything finite
    for fn in (gmm.posterior_x0, gmm.posterior_z, gmm.velocity, gmm.score, gmm.log_prob):
        assert np.all(np.isfinite(fn(MIX, far, _rng_t(64), SIGMA_D)))


def test_velocity_score_and_teacher_identities(x64):
    x, t = _rng_x(64), _rng_t(64)
    e_x0, e_z = gmm.posterior_x0(MIX, x, t, SIGMA_D), gmm.posterior_z(MIX, x, t, SIGMA_D)
    v = gmm.velocity(MIX, x, t, SIGMA_D)
    tb = t[:, None]
    np.testing.assert_allclose(v, jnp.cos(tb) * e_z - jnp.sin(tb) * e_x0, atol=1e-14)
    # E[x_t | x_t] = x_t: the posteriors are consistent with the forward process.
    np.testing.assert_allclose(tf.add_noise(e_x0, e_z, t), x, atol=1e-13)
    # The teacher F = v / sigma_d plugs into the TrigFlow denoiser and noise predictor.
    F = gmm.teacher_apply_fn(MIX, SIGMA_D)(None, x / SIGMA_D, t)
    np.testing.assert_allclose(tf.denoiser(x, t, F, SIGMA_D), e_x0, atol=1e-13)
    np.testing.assert_allclose(tf.predict_noise(x, t, F, SIGMA_D), e_z, atol=1e-13)
    # Score: autodiff of log p_t, and Tweedie's -E[z | x_t] / (sin t sigma_d^2).
    s = gmm.score(MIX, x, t, SIGMA_D)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(gmm.log_prob(MIX, x, t, SIGMA_D))))(x)
    np.testing.assert_allclose(s, grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s, -e_z / (jnp.sin(tb) * SIGMA_D**2), rtol=1e-10, atol=1e-12)


def test_log_prob_is_the_noised_density(x64):
    one = gmm.GaussianMixture(means=[[0.3, -0.2]], stds=[0.1], weights=[1.0])
    x, t = _rng_x(16), _rng_t(16)
    var = (np.cos(t) ** 2 * 0.1**2 + np.sin(t) ** 2 * SIGMA_D**2)[:, None]
    mu = np.cos(t)[:, None] * np.array([0.3, -0.2])
    expected = np.sum(-0.5 * (x - mu) ** 2 / var - 0.5 * np.log(2 * np.pi * var), axis=1)
    np.testing.assert_allclose(gmm.log_prob(one, x, t, SIGMA_D), expected, rtol=1e-12)


@jax.jit
def _mc_terms(x0, z, t):
    x_t = tf.add_noise(x0, z, t)
    return x_t, tf.velocity_target(x0, z, t), gmm.velocity(MIX, x_t, t, SIGMA_D)


def test_velocity_matches_monte_carlo(x64):
    rng = np.random.default_rng(3)
    n = 100_000
    # Single Gaussian: E[v | x_t] is affine in x_t; least squares on (x_t, v) recovers it.
    mu, s = np.array([0.3, -0.2]), 0.1
    one = gmm.GaussianMixture(means=[mu], stds=[s], weights=[1.0])
    t = 0.7
    x0 = mu + s * rng.normal(size=(n, 2))
    z = SIGMA_D * rng.normal(size=(n, 2))
    x_t = np.cos(t) * x0 + np.sin(t) * z
    v = np.cos(t) * z - np.sin(t) * x0
    design = np.concatenate([x_t, np.ones((n, 1))], axis=1)
    coef = np.linalg.lstsq(design, v, rcond=None)[0]  # (3, 2): slope (2, 2) and intercept
    probe = jnp.asarray(np.concatenate([np.zeros((1, 2)), np.eye(2)]))
    v_probe = np.asarray(gmm.velocity(one, probe, t, SIGMA_D))
    slope, intercept = v_probe[1:] - v_probe[:1], v_probe[0]
    np.testing.assert_allclose(coef[:2], slope, atol=3e-3)  # standard error ~4e-4
    np.testing.assert_allclose(coef[2], intercept, atol=3e-3)
    var = np.cos(t) ** 2 * s**2 + np.sin(t) ** 2 * SIGMA_D**2  # closed-form slope
    np.testing.assert_allclose(slope, np.cos(t) * np.sin(t) * (SIGMA_D**2 - s**2) / var * np.eye(2))
    # Mixture: E[(v - velocity(x_t)) g(x_t)] = 0 for test functions g (tower property).
    x0 = np.asarray(MIX.sample(jax.random.key(4), n, jnp.float64))
    z = SIGMA_D * rng.normal(size=(n, 2))
    for t in (0.2, 0.8, 1.4):
        x_t, v, v_hat = map(np.asarray, _mc_terms(x0, z, jnp.full(n, t)))
        for g in (np.ones_like(x_t), x_t, np.tanh(4 * x_t[:, ::-1])):
            diff = (v - v_hat) * g
            se = diff.std(0) / np.sqrt(n)
            assert np.all(np.abs(diff.mean(0)) < 5 * se + 1e-12), (t, diff.mean(0), se)


def test_flow_map_single_gaussian_closed_form(x64):
    """One component N(mu, s^2 I).

    x_to = cos t_to mu + (x - cos t_from mu) sqrt(v(t_to) / v(t_from)).
    """
    mu, s = np.array([0.3, -0.2]), 0.1
    one = gmm.GaussianMixture(means=[mu], stds=[s], weights=[1.0])
    x = _rng_x(32)

    def closed(x, t_from, t_to):
        def v(t):
            return np.cos(t) ** 2 * s**2 + np.sin(t) ** 2 * SIGMA_D**2

        return np.cos(t_to) * mu + (x - np.cos(t_from) * mu) * np.sqrt(v(t_to) / v(t_from))

    for t_from, t_to in [(math.pi / 2, 0.0), (0.0, math.pi / 2), (1.2, 0.3)]:
        y = gmm.flow_map(one, x, t_from, t_to, SIGMA_D)  # default 2000 RK4 steps: error ~1e-13
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(y, closed(np.asarray(x), t_from, t_to), atol=1e-10)
    # Per-sample times, and float32 input integrated in float64 then cast back.
    t_from, t_to = _rng_t(32), _rng_t(32, seed=2)
    y = gmm.flow_map(one, x, t_from, t_to, SIGMA_D, num_steps=500)
    expected = closed(np.asarray(x), np.asarray(t_from)[:, None], np.asarray(t_to)[:, None])
    np.testing.assert_allclose(y, expected, atol=1e-9)
    y32 = gmm.flow_map(one, x.astype(jnp.float32), t_from, t_to, SIGMA_D, num_steps=500)
    assert y32.dtype == jnp.float32
    np.testing.assert_allclose(y32, expected, atol=1e-6)


def test_flow_map_is_invertible_and_converges(x64):
    x = _rng_x(256, scale=0.4)
    y = gmm.flow_map(MIX, x, 0.1, 1.4, SIGMA_D, num_steps=400)
    np.testing.assert_allclose(gmm.flow_map(MIX, y, 1.4, 0.1, SIGMA_D, num_steps=400), x, atol=1e-9)
    # RK4 on the mixture from pi/2 to 0, against 400 steps (max errors measured against 2000
    # steps: 8e-6 at 50 steps, 6e-7 at 100, 2e-9 at 400): fourth order, ratio ~16 per doubling.
    z = _rng_x(256, scale=SIGMA_D)
    a, b, c = (gmm.flow_map(MIX, z, math.pi / 2, 0.0, SIGMA_D, num_steps=n) for n in (50, 100, 400))
    err_50, err_100 = float(jnp.abs(a - c).max()), float(jnp.abs(b - c).max())
    assert err_100 < 1e-6 and err_100 < err_50 / 10


def test_flow_map_transports_noise_to_the_mixture(x64):
    n = 2000
    z = _rng_x(n, seed=5, scale=SIGMA_D)  # x_{pi/2} = z ~ N(0, sigma_d^2 I) exactly
    x0 = np.asarray(gmm.flow_map(MIX, z, math.pi / 2, 0.0, SIGMA_D, num_steps=100))
    # Standard errors with n = 2000: ~1e-2 (mean), ~5e-3 (covariance).
    np.testing.assert_allclose(x0.mean(0), MIX.mean(), atol=0.04)
    np.testing.assert_allclose(np.cov(x0.T), MIX.cov(), atol=0.02)
    fresh = MIX.sample(jax.random.key(6), n, jnp.float64)
    assert abs(float(metrics.mmd_rbf(x0, fresh))) < 5e-3
    assert float(metrics.mmd_rbf(z, fresh)) > 0.1


def test_conditional_teacher_and_cfg(x64):
    a = gmm.GaussianMixture(means=[[-0.5, 0.0]], stds=[0.2], weights=[1.0])
    b = gmm.ring_mixture(3, radius=0.3, std=0.1)
    union = gmm.combine([a, b], [0.25, 0.75])
    apply_fn = gmm.conditional_teacher_apply_fn([a, b], SIGMA_D, class_probs=[0.25, 0.75])
    labels = jnp.array([0, 1, -1, 0, 1, -1, 1, 0])
    cond = jnp.array([0, 1, 0, 0, 1, 1, 1, 0])

    @jax.jit
    def fields(x_scaled, t):  # one program for all the evaluations below
        return {
            "F": apply_fn(None, x_scaled, t, labels),
            "one_hot": apply_fn(None, x_scaled, t, jax.nn.one_hot(labels, 2)),  # -1 -> zeros
            "none": apply_fn(None, x_scaled, t),
            "null": apply_fn(None, x_scaled, t, jnp.full(8, -1)),
            "cond": apply_fn(None, x_scaled, t, cond),
            "cfg1": guided_F(apply_fn, None, x_scaled, t, cond, 1.0),
            "per_class": [
                gmm.teacher_apply_fn(g, SIGMA_D)(None, x_scaled, t) for g in (a, b, union)
            ],
        }

    out = fields(_rng_x(8) / SIGMA_D, _rng_t(8))
    for i, F_i in enumerate(out["per_class"]):
        rows = np.flatnonzero(np.where(labels < 0, 2, labels) == i)
        np.testing.assert_allclose(out["F"][rows], F_i[rows], atol=1e-14)
    np.testing.assert_allclose(out["one_hot"], out["F"], atol=1e-14)
    np.testing.assert_allclose(out["none"], out["null"], atol=1e-14)
    np.testing.assert_allclose(out["null"], out["per_class"][2], atol=1e-14)
    np.testing.assert_allclose(out["cfg1"], out["cond"], atol=1e-14)
    with pytest.raises(ValueError, match="combine needs one prob per mixture"):
        gmm.combine([a, b], [1.0])


def test_sliced_wasserstein_closed_form():
    x = np.random.default_rng(7).normal(size=(500, 2)) * 0.3
    delta = np.array([0.2, 0.1])
    key = jax.random.key(8)
    assert float(metrics.sliced_wasserstein(x, x, key)) == pytest.approx(0.0, abs=1e-6)
    # Shifted copy: sorted projections shift by theta . delta, so SW2^2 = E(theta . delta)^2 =
    # |delta|^2 / D (1024 directions: ~1.1% Monte-Carlo error; a W1 average would give 10% less).
    sw = float(metrics.sliced_wasserstein(x, x + delta, key, num_projections=1024))
    assert sw == pytest.approx(np.linalg.norm(delta) / np.sqrt(2), rel=0.04)
    # Same law, independent draws of 2000: ~0.02 (empirical W2 shrinks slowly with n).
    x, y = (np.random.default_rng(s).normal(size=(2000, 2)) * 0.3 for s in (9, 10))
    assert float(metrics.sliced_wasserstein(x, y, key)) < 0.2 * sw
    with pytest.raises(ValueError, match="equal shape"):
        metrics.sliced_wasserstein(x, x[:10], key)


def test_mmd_rbf_closed_form(x64):
    """For N(0, a^2 I) vs N(delta, a^2 I): MMD^2 = sum_h 2 r^(D/2) (1 - exp(-|delta|^2 / (2 h^2 r)))
    with r = h^2 / (h^2 + 2 a^2) (D = 2)."""
    rng = np.random.default_rng(10)
    a, delta, n = 0.3, np.array([0.2, 0.1]), 2000
    x, y = rng.normal(size=(n, 2)) * a, rng.normal(size=(n, 2)) * a
    bw = (0.05, 0.1, 0.2, 0.5, 1.0)
    expected = sum(
        2 * h**2 / (h**2 + 2 * a**2) * (1 - np.exp(-delta @ delta / (2 * (h**2 + 2 * a**2))))
        for h in bw
    )
    assert expected == pytest.approx(0.1568, abs=1e-4)
    # Estimator spread at n = 2000 is ~0.01 for the shifted pair and ~1e-3 for equal laws.
    assert float(metrics.mmd_rbf(x, y + delta, bw)) == pytest.approx(expected, abs=0.03)
    assert abs(float(metrics.mmd_rbf(x, y, bw))) < 5e-3
    with pytest.raises(ValueError, match=r"bandwidths must be non-empty and > 0; got \(0.0,\)"):
        metrics.mmd_rbf(x, y, (0.0,))


def test_mode_statistics_known_answers():
    """Coverage and precision of constructed sample sets, and of exact samples (2-D Rayleigh)."""
    ring = gmm.ring_mixture()
    means, stds, weights = ring.arrays()
    at_mode0 = jnp.tile(means[:1], (100, 1))  # every sample on mode 0's mean
    m = metrics.mode_statistics(at_mode0, means, stds, weights)
    assert m["mass"][0] == 1.0 and m["coverage_tv"] == pytest.approx(1 - 1 / 8)
    assert m["modes_covered"] == 1 and m["precision_dist"] == 0.0
    assert m["precision_in_radius"] == 1.0
    far = means * 10.0  # on the rays of the modes, far outside: all modes, no precision
    m = metrics.mode_statistics(jnp.repeat(far, 10, axis=0), means, stds, weights)
    assert m["coverage_tv"] == pytest.approx(0.0, abs=1e-6) and m["modes_covered"] == 8
    assert m["precision_in_radius"] == 0.0
    wide = gmm.GaussianMixture(ring.means, [0.01] * 8, ring.weights)  # separated components
    x = wide.sample(jax.random.key(0), 40_000)
    m = metrics.mode_statistics(x, *wide.arrays())
    assert m["coverage_tv"] < 0.02 and m["modes_covered"] == 8
    assert m["precision_dist"] == pytest.approx(math.sqrt(math.pi / 2), rel=0.02)
    assert m["precision_in_radius"] == pytest.approx(1 - math.exp(-2), abs=0.01)
    grid = gmm.grid_mixture()
    assert grid.num_components == 25 and grid.data_std() == pytest.approx(0.4272, abs=1e-4)
    with pytest.raises(ValueError, match="means must be"):
        metrics.mode_statistics(jnp.zeros((4, 3)), means, stds, weights)
