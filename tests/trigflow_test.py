"""TrigFlow identities, conversions and the time proposal (reference §1)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import trigflow as tf

SIGMA_D = 0.5


def _data(key, shape=(16, 4, 4, 3), dtype=jnp.float32):
    k0, k1, k2 = jax.random.split(key, 3)
    x0 = SIGMA_D * jax.random.normal(k0, shape, dtype)
    z = tf.sample_noise(k1, shape, SIGMA_D, dtype)
    t = jax.random.uniform(k2, shape[:1], dtype, 0.05, math.pi / 2 - 0.05)
    return x0, z, t


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_consistency_fn_is_identity_at_t0(dtype, x64):
    x0, _, _ = _data(jax.random.key(0), dtype=dtype)
    F = jax.random.normal(jax.random.key(1), x0.shape, dtype)
    out = tf.consistency_fn(x0, jnp.zeros(x0.shape[0], dtype), F, SIGMA_D)
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(out, x0)


def test_forward_process_endpoints_and_velocity(x64):
    x0, z, t = _data(jax.random.key(0), dtype=jnp.float64)
    np.testing.assert_allclose(tf.add_noise(x0, z, 0.0), x0, atol=0)
    np.testing.assert_allclose(tf.add_noise(x0, z, math.pi / 2), z, atol=1e-15)
    # v_t is the time derivative of x_t (per sample).
    _, dx_dt = jax.jvp(lambda t: tf.add_noise(x0, z, t), (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(dx_dt, tf.velocity_target(x0, z, t), rtol=1e-12, atol=1e-14)


def test_exact_velocity_recovers_data_and_noise(x64):
    x0, z, t = _data(jax.random.key(2), dtype=jnp.float64)
    x_t = tf.add_noise(x0, z, t)
    F = tf.velocity_target(x0, z, t) / SIGMA_D  # the ideal network output for this pair
    np.testing.assert_allclose(tf.denoiser(x_t, t, F, SIGMA_D), x0, atol=1e-12)
    np.testing.assert_allclose(tf.predict_noise(x_t, t, F, SIGMA_D), z, atol=1e-12)


def test_sigma_t_maps_and_t_max(x64):
    sigma = jnp.geomspace(1e-3, 1e3, 50)
    t = tf.t_from_sigma(sigma, SIGMA_D)
    np.testing.assert_allclose(tf.sigma_from_t(t, SIGMA_D), sigma, rtol=1e-12)
    assert tf.t_max(80.0, 0.5) == pytest.approx(math.atan(160.0))
    assert tf.t_max(80.0, 0.5) == pytest.approx(1.56455, abs=1e-5)


def test_edm_conversions_and_denoiser_agree(x64):
    """D_EDM = c_skip x_sigma + c_out F_EDM(c_in x_sigma) equals TrigFlow's D with F = -F_EDM."""
    x0, z, t = _data(jax.random.key(3), dtype=jnp.float64)
    sigma = tf.edm_sigma_from_t(t, SIGMA_D)
    x_sigma = x0 + sigma[:, None, None, None] * (z / SIGMA_D)  # EDM: x0 + sigma * eps
    x_t = tf.xt_from_edm(x_sigma, sigma, SIGMA_D)
    np.testing.assert_allclose(x_t, tf.add_noise(x0, z, t), atol=1e-12)
    np.testing.assert_allclose(tf.edm_from_xt(x_t, t), x_sigma, atol=1e-12)

    def F_edm(x_in):  # an arbitrary EDM network of its (scaled) input
        return jnp.tanh(1.3 * x_in) - 0.2 * x_in**2

    s = sigma[:, None, None, None]
    c_skip = SIGMA_D**2 / (s**2 + SIGMA_D**2)
    c_out = s * SIGMA_D / jnp.sqrt(s**2 + SIGMA_D**2)
    c_in = 1 / jnp.sqrt(s**2 + SIGMA_D**2)
    x_in = c_in * x_sigma
    np.testing.assert_allclose(x_in, x_t / SIGMA_D, atol=1e-12)  # both networks see x_t / sigma_d
    D_edm = c_skip * x_sigma + c_out * F_edm(x_in)
    D_trig = tf.denoiser(x_t, t, tf.F_from_edm(F_edm(x_in)), SIGMA_D)
    np.testing.assert_allclose(D_trig, D_edm, atol=1e-12)
    np.testing.assert_allclose(tf.edm_from_F(tf.F_from_edm(x_in)), x_in)
    np.testing.assert_allclose(tf.edm_c_noise(t, SIGMA_D), jnp.log(sigma) / 4, rtol=1e-12)


def test_vp_conversions_round_trip_and_agree(x64):
    x0, z, t = _data(jax.random.key(4), dtype=jnp.float64)
    alpha, sigma = tf.vp_alpha_sigma_from_t(t, SIGMA_D)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(tf.t_from_alpha_sigma(alpha, sigma, SIGMA_D), t, rtol=1e-12)
    eps = z / SIGMA_D
    x_vp = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    x_t = tf.xt_from_vp(x_vp, alpha, sigma, SIGMA_D)
    np.testing.assert_allclose(x_t, tf.add_noise(x0, z, t), atol=1e-12)
    np.testing.assert_allclose(tf.vp_from_xt(x_t, alpha, sigma, SIGMA_D), x_vp, atol=1e-12)
    # The exact epsilon prediction converts to the exact TrigFlow output, and back.
    F = tf.F_from_eps(x_t, t, eps, SIGMA_D)
    np.testing.assert_allclose(F, tf.velocity_target(x0, z, t) / SIGMA_D, atol=1e-10)
    np.testing.assert_allclose(tf.eps_from_F(x_t, t, F, SIGMA_D), eps, atol=1e-10)


def test_rectified_flow_conversions_round_trip_and_agree(x64):
    x0, z, t = _data(jax.random.key(5), dtype=jnp.float64)
    s = tf.rf_time_from_t(t)
    np.testing.assert_allclose(tf.t_from_rf_time(s), t, rtol=1e-12)
    x0p, eps = x0 / SIGMA_D, z / SIGMA_D
    sb = s[:, None, None, None]
    x_fm = (1 - sb) * x0p + sb * eps
    x_t = tf.add_noise(x0, z, t)
    np.testing.assert_allclose(tf.rf_from_xt(x_t, t, SIGMA_D), x_fm, atol=1e-12)
    np.testing.assert_allclose(tf.xt_from_rf(x_fm, t, SIGMA_D), x_t, atol=1e-12)
    v_fm = eps - x0p  # the exact flow-matching velocity for this pair
    F = tf.F_from_rf_velocity(x_fm, s, v_fm)
    np.testing.assert_allclose(F, tf.velocity_target(x0, z, t) / SIGMA_D, atol=1e-12)
    np.testing.assert_allclose(tf.rf_velocity_from_F(x_fm, s, F), v_fm, atol=1e-12)


def test_lognormal_proposal_quantiles(x64):
    P_mean, P_std = -1.0, 1.4
    t = tf.sample_t_lognormal(jax.random.key(6), (400_000,), P_mean, P_std, SIGMA_D, jnp.float64)
    assert t.dtype == jnp.float64 and float(t.min()) > 0 and float(t.max()) < math.pi / 2
    q = np.array([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    expected = tf.lognormal_t_quantile(q, P_mean, P_std, SIGMA_D)
    np.testing.assert_allclose(np.quantile(np.asarray(t), q), expected, atol=4e-3)
    # The median is arctan(e^P_mean / sigma_d): 0.634 rad for (-1.0, 0.5) (reference §1.5).
    assert float(expected[3]) == pytest.approx(math.atan(math.exp(P_mean) / SIGMA_D))
    assert float(expected[3]) == pytest.approx(0.634, abs=1e-3)


def test_ddim_step_is_exact_for_a_point_mass(x64):
    x0, z, _ = _data(jax.random.key(7), dtype=jnp.float64)
    s, t = 1.3, 0.4
    x_s = tf.add_noise(x0, z, s)
    F = tf.velocity_target(x0, z, s) / SIGMA_D
    np.testing.assert_allclose(
        tf.ddim_step(x_s, s, t, F, SIGMA_D), tf.add_noise(x0, z, t), atol=1e-12
    )
    # A DDIM step to t = 0 is the consistency function.
    np.testing.assert_allclose(
        tf.ddim_step(x_s, s, 0.0, F, SIGMA_D), tf.consistency_fn(x_s, s, F, SIGMA_D), atol=1e-15
    )


def test_ddim_integrates_the_gaussian_pf_ode(x64):
    """For x0 ~ N(0, a^2) the exact F is linear and the PF-ODE keeps x_t / std(t) constant."""
    a = 1.5  # data std != sigma_d, so the flow is non-trivial

    def var(t):
        return jnp.cos(t) ** 2 * a**2 + jnp.sin(t) ** 2 * SIGMA_D**2

    def F_exact(x, t):  # E[v | x_t] / sigma_d = cos t sin t (sigma_d^2 - a^2) x / var(t) / sigma_d
        return jnp.cos(t) * jnp.sin(t) * (SIGMA_D**2 - a**2) * x / var(t) / SIGMA_D

    x = jnp.linspace(-2, 2, 9)
    t_grid = jnp.linspace(1.4, 0.0, 4001)
    y = x
    for s, t in itertools.pairwise(t_grid):
        y = tf.ddim_step(y, s, t, F_exact(y, s), SIGMA_D)
    np.testing.assert_allclose(y, x * jnp.sqrt(var(0.0) / var(1.4)), rtol=2e-3)


def test_functions_keep_float32(x64):
    x0, z, t = _data(jax.random.key(8), dtype=jnp.float32)
    F = jnp.zeros_like(x0)
    for out in (
        tf.add_noise(x0, z, t),
        tf.velocity_target(x0, z, t),
        tf.denoiser(x0, t, F, SIGMA_D),
        tf.ddim_step(x0, t, t / 2, F, SIGMA_D),
        tf.xt_from_rf(x0, t, SIGMA_D),
    ):
        assert out.dtype == jnp.float32
