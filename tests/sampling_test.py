"""Samplers against the exact Gaussian-mixture teacher and flow map (reference §1.2, §4)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import gmm, sampling
from scm_jax import trigflow as tf

SIGMA_D = 0.5
T_MAX = tf.t_max(80.0, SIGMA_D)
# Non-zero mean and data std 0.39 != sigma_d: returning the noise unchanged fails every check.
MIX = gmm.GaussianMixture(
    means=[[0.6, 0.0], [-0.3, 0.4], [0.0, -0.5]], stds=[0.1, 0.2, 0.15], weights=[0.5, 0.3, 0.2]
)
TEACHER = gmm.teacher_apply_fn(MIX, SIGMA_D)
ode = jax.jit(sampling.sample_ode, static_argnames=sampling.ODE_STATIC)


def _noise(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 2)) * SIGMA_D)


def _rms(a, b):
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


def test_consistency_times():
    assert sampling.consistency_times(1, T_MAX) == (T_MAX,)
    assert sampling.consistency_times(2, T_MAX) == (T_MAX, 1.1)
    assert sampling.consistency_times(3, T_MAX) == pytest.approx((T_MAX, 1.1, 0.55))
    times = sampling.consistency_times(5, T_MAX, t_mid=0.9)
    assert len(times) == 5 and all(a > b > 0 for a, b in itertools.pairwise(times))
    with pytest.raises(ValueError, match="t_mid must be in"):
        sampling.consistency_times(2, 1.0, t_mid=1.1)
    with pytest.raises(ValueError, match="num_steps >= 1; got 0"):
        sampling.consistency_times(0, T_MAX)


def test_edm_times():
    t = sampling.edm_times(18, SIGMA_D)
    assert t.shape == (19,) and t.dtype == np.float64 and t[-1] == 0.0
    assert np.all(np.diff(t) < 0)
    sigma = SIGMA_D * np.tan(t[:-1])
    # EDM (Karras et al. 2022, Eq. 5): sigma_i = (80^(1/7) + i/17 (0.002^(1/7) - 80^(1/7)))^7.
    i = np.arange(18)
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigma, expected, rtol=1e-12)
    assert t[0] == pytest.approx(T_MAX)
    np.testing.assert_allclose(sampling.edm_times(1, SIGMA_D), [T_MAX, 0.0])
    with pytest.raises(ValueError, match=r"sigma_min < sigma_max; got 1.0, 0.5"):
        sampling.edm_times(4, SIGMA_D, sigma_min=1.0, sigma_max=0.5)


def test_nfe_counts_network_calls():
    """nfe is returned statically and equals the number of F evaluations actually run."""
    calls = []

    def counting_fn(params, x_scaled, t, labels=None, guidance=None, key=None):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.zeros_like(x_scaled)

    for solver, n, expected in (("heun", 18, 35), ("euler", 18, 18), ("heun", 1, 1)):
        calls.clear()
        fn, nfe = sampling.make_ode_sampler(counting_fn, (4, 2), n, SIGMA_D, solver=solver)
        jax.block_until_ready(fn(None, jax.random.key(0)))
        jax.effects_barrier()
        assert nfe == expected == len(calls) == sampling.ode_nfe(n, solver)
    assert ode(TEACHER, None, jax.random.key(0), (4, 2), 18, SIGMA_D)[1] == 35


def test_point_mass_is_integrated_exactly(x64):
    """For data at one point both solvers are exact on any grid (DDIM is exact; eps is constant)."""
    x_star = jnp.array([0.3, -0.7])

    def point_mass(params, x_scaled, t, labels=None, guidance=None, key=None):
        x_t, tb = x_scaled * SIGMA_D, t[:, None]
        z = (x_t - jnp.cos(tb) * x_star) / jnp.sin(tb)
        return tf.velocity_target(jnp.broadcast_to(x_star, z.shape), z, t) / SIGMA_D

    for solver in ("euler", "heun"):
        x0, _ = ode(point_mass, None, _noise(16), (16, 2), 3, SIGMA_D, solver)
        np.testing.assert_allclose(x0, jnp.broadcast_to(x_star, (16, 2)), atol=1e-12)


@pytest.mark.parametrize(("solver", "num_steps"), [("heun", 32), ("euler", 256)])
def test_ode_sampler_reproduces_the_mixture(solver, num_steps):
    """float32, 4000 samples: standard errors ~7e-3 (mean) and ~4e-3 (covariance entries)."""
    n = 4000
    sample, _ = sampling.make_ode_sampler(TEACHER, (n, 2), num_steps, SIGMA_D, solver=solver)
    x0 = sample(None, jax.random.key(1))
    assert x0.dtype == jnp.float32 and x0.shape == (n, 2)
    x0 = np.asarray(x0, np.float64)
    np.testing.assert_allclose(x0.mean(0), MIX.mean(), atol=0.03)
    np.testing.assert_allclose(np.cov(x0.T), MIX.cov(), atol=0.02)
    # The key path draws x_{t_max} = trigflow.sample_noise(key, shape, sigma_d, dtype).
    x_init = tf.sample_noise(jax.random.key(1), (n, 2), SIGMA_D)
    np.testing.assert_allclose(sample(None, x_init), x0, atol=1e-6)


def test_heun_beats_euler_at_equal_nfe(x64):
    """Final-sample RMS error against the exact flow map of the same noise (500 samples)."""
    x = _noise(500, seed=2)
    exact = gmm.flow_map(MIX, x, T_MAX, 0.0, SIGMA_D, num_steps=400)  # RK4 error ~1e-9
    err = {}
    for solver, n in [("heun", 18), ("euler", 35), ("heun", 32), ("euler", 63), ("heun", 64)]:
        x0, nfe = ode(TEACHER, None, x, (500, 2), n, SIGMA_D, solver)
        err[solver, int(nfe)] = _rms(x0, exact)  # nfe comes back as a 0-d array under jit
    print("RMS error vs the exact flow map, (solver, NFE):", err)  # quoted in docs/method.md
    assert err["heun", 35] < err["euler", 35]
    assert err["heun", 63] < 0.5 * err["euler", 63]
    assert err["heun", 127] < 0.3 * err["heun", 63] and err["heun", 127] < 2e-3  # second order
    assert 0.4 < err["euler", 63] / err["euler", 35] < 0.75  # first order


def _exact_consistency_fn(mixture, num_steps=50):
    """F with consistency_fn(x_t, t, F) = Phi_t(x_t) (the exact PF-ODE map from t to 0)."""

    def apply_fn(params, x_scaled, t, labels=None, guidance=None, key=None):
        x_t, tb = x_scaled * SIGMA_D, t[:, None]
        phi = gmm.flow_map(mixture, x_t, t, 0.0, SIGMA_D, num_steps=num_steps)
        return (jnp.cos(tb) * x_t - phi) / (SIGMA_D * jnp.sin(tb))

    return apply_fn


def test_exact_consistency_model_samples(x64):
    cm = _exact_consistency_fn(MIX)
    n = 1000
    key = jax.random.key(3)
    one_step = sampling.make_consistency_sampler(cm, (n, 2), (T_MAX,), SIGMA_D, jnp.float64)
    x0 = one_step(None, key)
    # Documented key use: x_{t_max} = sample_noise(split(key)[0], ...).
    z = tf.sample_noise(jax.random.split(key)[0], (n, 2), SIGMA_D, jnp.float64)
    np.testing.assert_allclose(x0, gmm.flow_map(MIX, z, T_MAX, 0.0, SIGMA_D, 50), atol=1e-12)
    # Two steps (t_mid = 1.1) with an exact CM still give exact samples of the mixture.
    times = sampling.consistency_times(2, T_MAX)
    two_step = sampling.make_consistency_sampler(cm, (n, 2), times, SIGMA_D, jnp.float64)
    x0 = np.asarray(two_step(None, key))
    np.testing.assert_allclose(x0.mean(0), MIX.mean(), atol=0.04)  # standard error ~1.4e-2
    np.testing.assert_allclose(np.cov(x0.T), MIX.cov(), atol=0.025)


def test_consistency_sampler_steps_labels_and_guidance():
    """A linear toy F makes every step checkable in closed form; jitted equals eager."""

    def toy(params, x_scaled, t, labels=None, guidance=None, key=None):
        return params * x_scaled + guidance[:, None] + labels[:, None]

    n, times, key = 6, (1.5, 0.7), jax.random.key(4)
    labels = jnp.arange(n)
    params = jnp.float32(0.3)
    direct = sampling.sample_consistency(toy, params, key, (n, 2), times, SIGMA_D, labels, 2.0)
    jitted = jax.jit(sampling.sample_consistency, static_argnames=sampling.CONSISTENCY_STATIC)
    via_jit = jitted(toy, params, key, (n, 2), times, SIGMA_D, labels, jnp.full(n, 2.0))
    made = sampling.make_consistency_sampler(toy, (n, 2), times, SIGMA_D)(params, key, labels, 2.0)
    unrolled = sampling.make_consistency_sampler(toy, (n, 2), times, SIGMA_D, unroll=True)
    np.testing.assert_allclose(via_jit, direct, atol=1e-6)
    np.testing.assert_allclose(made, direct, atol=1e-6)
    np.testing.assert_allclose(unrolled(params, key, labels, 2.0), direct, atol=1e-6)

    k_init, k_steps = jax.random.split(key)
    x = np.asarray(tf.sample_noise(k_init, (n, 2), SIGMA_D), np.float64)
    z1 = np.asarray(tf.sample_noise(jax.random.split(k_steps, 2)[0], (n, 2), SIGMA_D))
    for i, t in enumerate(times):
        F = 0.3 * x / SIGMA_D + 2.0 + np.arange(n)[:, None]
        x0 = np.cos(t) * x - np.sin(t) * SIGMA_D * F
        if i == 0:
            x = np.cos(times[1]) * x0 + np.sin(times[1]) * z1
    np.testing.assert_allclose(direct, x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("times", "message"),
    [
        ((0.0,), r"time 0.0 is outside \(0, pi/2\]"),
        ((1.6,), r"time 1.6 is outside \(0, pi/2\]"),
        ((1.0, 1.2), r"strictly decreasing; got 1.2 after 1.0"),
        ((1.0, 1.0), r"strictly decreasing; got 1.0 after 1.0"),
        ((), r"at least one time"),
    ],
)
def test_bad_times_raise(times, message):
    with pytest.raises(ValueError, match=message):
        sampling.make_consistency_sampler(TEACHER, (2, 2), times, SIGMA_D)
    with pytest.raises(ValueError, match=message):
        sampling.sample_consistency(TEACHER, None, jax.random.key(0), (2, 2), times, SIGMA_D)


def test_ode_sampler_argument_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="unknown ODE solver 'rk4'"):
        sampling.sample_ode(TEACHER, None, key, (2, 2), 4, SIGMA_D, solver="rk4")
    with pytest.raises(ValueError, match="guidance_scale needs labels"):
        sampling.sample_ode(TEACHER, None, key, (2, 2), 4, SIGMA_D, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"initial x has shape \(3, 2\); expected \(2, 2\)"):
        sampling.sample_ode(TEACHER, None, jnp.zeros((3, 2)), (2, 2), 4, SIGMA_D)
    with pytest.raises(ValueError, match="num_steps >= 1; got 0"):
        sampling.make_ode_sampler(TEACHER, (2, 2), 0, SIGMA_D)


def test_classifier_free_guidance_with_a_labelled_teacher(x64):
    left = gmm.GaussianMixture(means=[[-0.4, 0.0]], stds=[0.2], weights=[1.0])
    right = gmm.ring_mixture(3, radius=0.2, std=0.1)
    shifted = np.asarray(right.means) + np.array([0.4, 0.0])
    right = gmm.GaussianMixture(shifted, right.stds, right.weights)
    labelled = gmm.conditional_teacher_apply_fn([left, right], SIGMA_D)
    n = 400
    x, labels = _noise(n, seed=5), jnp.repeat(jnp.array([0, 1]), n // 2)

    def run(labels, scale):
        return ode(labelled, None, x, (n, 2), 18, SIGMA_D, labels=labels, guidance_scale=scale)

    conditional, nfe = run(labels, None)
    guided_1, nfe_guided = run(labels, 1.0)
    # nfe counts guided evaluations (two network passes each).
    assert int(nfe) == int(nfe_guided) == 35
    np.testing.assert_allclose(guided_1, conditional, atol=1e-12)  # s = 1: conditional model
    unconditional, _ = run(jnp.full(n, -1), None)
    np.testing.assert_allclose(run(labels, 0.0)[0], unconditional, atol=1e-12)  # s = 0
    per_sample = run(labels, jnp.where(labels == 0, 1.0, 0.0))[0]  # (B,) scales
    np.testing.assert_allclose(per_sample[: n // 2], conditional[: n // 2], atol=1e-12)
    np.testing.assert_allclose(per_sample[n // 2 :], unconditional[n // 2 :], atol=1e-12)
    # Conditional samples follow their class; s = 3 pushes them further apart.
    c = np.asarray(conditional)
    np.testing.assert_allclose(c[: n // 2].mean(0), left.mean(), atol=0.06)
    np.testing.assert_allclose(c[n // 2 :].mean(0), right.mean(), atol=0.06)
    g3 = np.asarray(run(labels, 3.0)[0])
    gap = lambda s: s[n // 2 :, 0].mean() - s[: n // 2, 0].mean()
    assert gap(g3) > gap(c) + 0.05
    assert math.isfinite(float(np.abs(g3).max()))


def test_sampler_sample_in_several_batches_keeps_order():
    """Sampler.sample copies batch i while batch i + 1 computes; the result is batch after
    batch, each from fold_in(key, i), the last one cut to size."""
    from helpers import tiny_unet

    from scm_jax.run.sampler import Sampler

    nd = tiny_unet()
    sampler = Sampler(nd, nd.init(jax.random.key(0))["net"], sigma_d=SIGMA_D, batch_size=2)
    out = sampler.sample(7, 5, steps=1, labels=[0, 1, 2, 3, 4])
    key = jax.random.key(7)
    want = [
        sampler.sample_batch(jax.random.fold_in(key, i), 2, 1, labels)[:n]
        for i, (labels, n) in enumerate((([0, 1], 2), ([2, 3], 2), ([4, 0], 1)))
    ]
    np.testing.assert_array_equal(out, np.clip(np.concatenate(want), -1, 1))
