"""TrigFlow: the noise process, its ODE, and conversions to other diffusion conventions.

Pure functions of arrays; they work in any floating dtype (float32, float64, bfloat16) and never
see a config. Equation and section numbers refer to sCM (Lu & Song 2024) and to
``docs/method.md``.

Symbols (paper name -> code name):

=============================  ===========  ==================================================
symbol                         name         meaning
=============================  ===========  ==================================================
x_0                            ``x0``       clean data, per-element std ``sigma_d``
z                              ``z``        noise, z ~ N(0, sigma_d^2 I) (same std as the data)
t in [0, pi/2]                 ``t``        TrigFlow time, shape ``(B,)`` or scalar
x_t                            ``x_t``      cos(t) x0 + sin(t) z
sigma_d                        ``sigma_d``  data standard deviation (0.5 in all sCM runs)
F_theta(x_t / sigma_d, t)      ``F``        raw network output (sigma_d-normalised velocity)
dx_t/dt                        ``dx_dt``    PF-ODE velocity, sigma_d * F
=============================  ===========  ==================================================

Time arrays ``t`` broadcast against data arrays from the left: ``t`` of shape ``(B,)`` scales a
batch ``x`` of shape ``(B, ...)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "F_from_edm",
    "F_from_eps",
    "F_from_rf_velocity",
    "add_noise",
    "consistency_fn",
    "ddim_step",
    "denoiser",
    "edm_c_noise",
    "edm_from_F",
    "edm_from_xt",
    "edm_sigma_from_t",
    "eps_from_F",
    "lognormal_t_quantile",
    "predict_noise",
    "rf_from_xt",
    "rf_time_from_t",
    "rf_velocity_from_F",
    "sample_noise",
    "sample_t_lognormal",
    "sigma_from_t",
    "t_from_alpha_sigma",
    "t_from_edm_sigma",
    "t_from_rf_time",
    "t_from_sigma",
    "t_max",
    "velocity_target",
    "vp_alpha_sigma_from_t",
    "vp_from_xt",
    "xt_from_edm",
    "xt_from_rf",
    "xt_from_vp",
]


def _bcast(t: Array | float, x: Array) -> Array:
    """Reshape time ``t`` (scalar or ``(B,)``) so it broadcasts over ``x`` of shape ``(B, ...)``."""
    t = jnp.asarray(t)
    return t.reshape(t.shape + (1,) * (jnp.ndim(x) - t.ndim))


# ---------------------------------------------------------------------------------------------
# Forward process and targets (sCM §2, Eq. 1; reference §1.1-1.2)


def sample_noise(key: Array, shape: tuple[int, ...], sigma_d: float, dtype=jnp.float32) -> Array:
    """Draw z ~ N(0, sigma_d^2 I) with the given shape and dtype (same std as the data)."""
    return sigma_d * jax.random.normal(key, shape, dtype)


def add_noise(x0: Array, z: Array, t: Array | float) -> Array:
    """Forward process x_t = cos(t) x0 + sin(t) z.

    Args:
      x0: clean data ``(B, ...)``, float.
      z: noise with the same shape, std sigma_d.
      t: TrigFlow time, scalar or ``(B,)``.
    Returns:
      ``x_t`` with the shape and dtype of ``x0``.
    """
    return jnp.cos(_bcast(t, x0)) * x0 + jnp.sin(_bcast(t, x0)) * z


def velocity_target(x0: Array, z: Array, t: Array | float) -> Array:
    """Diffusion (and sCT tangent) target v_t = dx_t/dt = cos(t) z - sin(t) x0, shape of ``x0``."""
    return jnp.cos(_bcast(t, x0)) * z - jnp.sin(_bcast(t, x0)) * x0


# ---------------------------------------------------------------------------------------------
# Network output -> predictions (reference §1.2, §1.3)


def denoiser(x_t: Array, t: Array | float, F: Array, sigma_d: float) -> Array:
    """Denoiser D(x_t, t) = cos(t) x_t - sin(t) sigma_d F (c_skip = cos t, c_out = -sigma_d sin t).

    Args:
      x_t: noisy sample ``(B, ...)``.
      t: time, scalar or ``(B,)``.
      F: network output F_theta(x_t / sigma_d, t), same shape as ``x_t``.
      sigma_d: data standard deviation.
    Returns:
      Predicted x0, same shape and dtype as ``x_t``.
    """
    return jnp.cos(_bcast(t, x_t)) * x_t - jnp.sin(_bcast(t, x_t)) * sigma_d * F


def consistency_fn(x_t: Array, t: Array | float, F: Array, sigma_d: float) -> Array:
    """Consistency function f(x_t, t) = cos(t) x_t - sin(t) sigma_d F (sCM Eq. 5).

    It is the one-step DDIM solution from t to 0, so f(x, 0) = x exactly. Same formula as
    :func:`denoiser`; kept as its own name because the two roles differ (a consistency model is
    trained so that f is constant along PF-ODE trajectories). Shapes as in :func:`denoiser`.
    """
    return denoiser(x_t, t, F, sigma_d)


def predict_noise(x_t: Array, t: Array | float, F: Array, sigma_d: float) -> Array:
    """Predicted noise z = sin(t) x_t + cos(t) sigma_d F (inverse of the forward process)."""
    return jnp.sin(_bcast(t, x_t)) * x_t + jnp.cos(_bcast(t, x_t)) * sigma_d * F


def ddim_step(x_s: Array, s: Array | float, t: Array | float, F: Array, sigma_d: float) -> Array:
    """First-order (DDIM) PF-ODE step from time s to time t (reference §1.2, App. B).

    x_t = cos(s - t) x_s - sin(s - t) sigma_d F(x_s / sigma_d, s). Exact when the data is a point
    mass; with t = 0 it equals :func:`consistency_fn`.

    Args:
      x_s: sample at time ``s``, ``(B, ...)``.
      s, t: start and end times (scalars or ``(B,)``); t < s integrates towards the data.
      F: network output at (x_s / sigma_d, s).
      sigma_d: data standard deviation.
    """
    d = _bcast(s, x_s) - _bcast(t, x_s)
    return jnp.cos(d) * x_s - jnp.sin(d) * sigma_d * F


# ---------------------------------------------------------------------------------------------
# Time: sigma <-> t, t_max and the log-normal proposal (reference §1.4-1.5, §4)


def sigma_from_t(t: Array | float, sigma_d: float) -> Array:
    """EDM noise level of TrigFlow time: sigma = sigma_d tan(t)."""
    return sigma_d * jnp.tan(t)


def t_from_sigma(sigma: Array | float, sigma_d: float) -> Array:
    """TrigFlow time of an EDM noise level: t = arctan(sigma / sigma_d)."""
    return jnp.arctan(jnp.asarray(sigma) / sigma_d)


edm_sigma_from_t = sigma_from_t
t_from_edm_sigma = t_from_sigma


def t_max(sigma_max: float, sigma_d: float) -> float:
    """Sampling start time t_max = arctan(sigma_max / sigma_d); 1.56455 for (80, 0.5)."""
    return math.atan(sigma_max / sigma_d)


def sample_t_lognormal(
    key: Array,
    shape: tuple[int, ...],
    P_mean: float,
    P_std: float,
    sigma_d: float,
    dtype=jnp.float32,
) -> Array:
    """Time proposal: tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d) (sCM §4.2).

    Equivalently the EDM sigma = sigma_d tan(t) is log-normal with parameters (P_mean, P_std).
    Returns times of ``shape`` and ``dtype`` in (0, pi/2).
    """
    tau = P_mean + P_std * jax.random.normal(key, shape, dtype)
    return jnp.arctan(jnp.exp(tau) / sigma_d)


def lognormal_t_quantile(q: Array | float, P_mean: float, P_std: float, sigma_d: float) -> Array:
    """Quantile function of :func:`sample_t_lognormal`.

    t_q = arctan(exp(P_mean + P_std Phi^-1(q)) / sigma_d), Phi the standard normal CDF.
    """
    q = jnp.asarray(q)
    return jnp.arctan(jnp.exp(P_mean + P_std * jax.scipy.special.ndtri(q)) / sigma_d)


# ---------------------------------------------------------------------------------------------
# EDM (VE, x_sigma = x0 + sigma eps) <-> TrigFlow (reference §1.4)


def edm_c_noise(t: Array | float, sigma_d: float) -> Array:
    """EDM's noise conditioning c_noise = ln(sigma) / 4 with sigma = sigma_d tan(t)."""
    return jnp.log(sigma_from_t(t, sigma_d)) / 4


def xt_from_edm(x_sigma: Array, sigma: Array | float, sigma_d: float) -> Array:
    """TrigFlow state of an EDM state.

    x_t = cos(t) x_sigma = sigma_d x_sigma / sqrt(sigma^2 + sigma_d^2).
    """
    sigma = _bcast(sigma, x_sigma)
    return sigma_d * x_sigma / jnp.sqrt(sigma**2 + sigma_d**2)


def edm_from_xt(x_t: Array, t: Array | float) -> Array:
    """EDM state of a TrigFlow state: x_sigma = x_t / cos(t) (undefined at t = pi/2)."""
    return x_t / jnp.cos(_bcast(t, x_t))


def F_from_edm(F_edm: Array) -> Array:
    """TrigFlow network output from EDM's raw output: F_TrigFlow = -F_EDM.

    EDM: D = c_skip x_sigma + c_out F_EDM(c_in x_sigma, c_noise) with c_in x_sigma = x_t / sigma_d,
    so the two networks see the same input and D = cos(t) x_t + sigma_d sin(t) F_EDM.
    """
    return -F_edm


def edm_from_F(F: Array) -> Array:
    """EDM raw output from the TrigFlow output (inverse of :func:`F_from_edm`)."""
    return -F


# ---------------------------------------------------------------------------------------------
# General VP / VE (x' = alpha x0 + sigma eps, eps ~ N(0, I)) <-> TrigFlow (reference §1.4)


def t_from_alpha_sigma(alpha: Array | float, sigma: Array | float, sigma_d: float) -> Array:
    """TrigFlow time of a (alpha, sigma) schedule point: t = arctan(sigma / (sigma_d alpha))."""
    return jnp.arctan2(jnp.asarray(sigma), sigma_d * jnp.asarray(alpha))


def vp_alpha_sigma_from_t(t: Array | float, sigma_d: float) -> tuple[Array, Array]:
    """Variance-preserving (alpha^2 + sigma^2 = 1) coefficients with the same SNR as time t.

    sigma / alpha = sigma_d tan(t), so alpha = 1 / sqrt(1 + sigma_d^2 tan^2 t). Computed from
    sin/cos so that t = pi/2 gives (0, 1).
    """
    t = jnp.asarray(t)
    num_a, num_s = jnp.cos(t), sigma_d * jnp.sin(t)
    norm = jnp.sqrt(num_a**2 + num_s**2)
    return num_a / norm, num_s / norm


def xt_from_vp(x_prime: Array, alpha: Array | float, sigma: Array | float, sigma_d: float) -> Array:
    """TrigFlow state of x' = alpha x0 + sigma eps.

    x_t = sigma_d x' / sqrt(alpha^2 sigma_d^2 + sigma^2).
    """
    alpha, sigma = _bcast(alpha, x_prime), _bcast(sigma, x_prime)
    return sigma_d * x_prime / jnp.sqrt(alpha**2 * sigma_d**2 + sigma**2)


def vp_from_xt(x_t: Array, alpha: Array | float, sigma: Array | float, sigma_d: float) -> Array:
    """Inverse of :func:`xt_from_vp`: x' = x_t sqrt(alpha^2 sigma_d^2 + sigma^2) / sigma_d."""
    alpha, sigma = _bcast(alpha, x_t), _bcast(sigma, x_t)
    return x_t * jnp.sqrt(alpha**2 * sigma_d**2 + sigma**2) / sigma_d


def F_from_eps(x_t: Array, t: Array | float, eps: Array, sigma_d: float) -> Array:
    """TrigFlow output from an epsilon prediction (z = sigma_d eps).

    F = (sigma_d eps - sin t x_t) / (sigma_d cos t).

    Singular at t = pi/2, where an epsilon predictor carries no information about x0.
    """
    tb = _bcast(t, x_t)
    return (sigma_d * eps - jnp.sin(tb) * x_t) / (sigma_d * jnp.cos(tb))


def eps_from_F(x_t: Array, t: Array | float, F: Array, sigma_d: float) -> Array:
    """Epsilon prediction from the TrigFlow output, eps = z / sigma_d (inverse of F_from_eps)."""
    return predict_noise(x_t, t, F, sigma_d) / sigma_d


# ---------------------------------------------------------------------------------------------
# Rectified flow / flow matching (x_s = (1 - s) x0' + s eps, x0' = x0 / sigma_d) <-> TrigFlow
# (reference §1.4; SANA-Sprint Prop. 3.1)


def rf_time_from_t(t: Array | float) -> Array:
    """Rectified-flow time of TrigFlow time: s = sin t / (sin t + cos t)."""
    t = jnp.asarray(t)
    return jnp.sin(t) / (jnp.sin(t) + jnp.cos(t))


def t_from_rf_time(s: Array | float) -> Array:
    """TrigFlow time of rectified-flow time: tan t = s / (1 - s)."""
    s = jnp.asarray(s)
    return jnp.arctan2(s, 1 - s)


def rf_from_xt(x_t: Array, t: Array | float, sigma_d: float) -> Array:
    """Rectified-flow state of a TrigFlow state: x_FM = (x_t / sigma_d) / (cos t + sin t)."""
    tb = _bcast(t, x_t)
    return (x_t / sigma_d) / (jnp.cos(tb) + jnp.sin(tb))


def xt_from_rf(x_fm: Array, t: Array | float, sigma_d: float) -> Array:
    """Inverse of :func:`rf_from_xt`: x_t = sigma_d x_FM (cos t + sin t)."""
    tb = _bcast(t, x_fm)
    return sigma_d * x_fm * (jnp.cos(tb) + jnp.sin(tb))


def F_from_rf_velocity(x_fm: Array, s: Array | float, v_fm: Array) -> Array:
    """TrigFlow output from a flow-matching velocity v = eps - x0' at (x_FM, s).

    F = [(1 - 2s) x_FM + (1 - 2s + 2s^2) v] / sqrt(s^2 + (1 - s)^2).
    """
    sb = _bcast(s, x_fm)
    return ((1 - 2 * sb) * x_fm + (1 - 2 * sb + 2 * sb**2) * v_fm) / jnp.sqrt(sb**2 + (1 - sb) ** 2)


def rf_velocity_from_F(x_fm: Array, s: Array | float, F: Array) -> Array:
    """Flow-matching velocity from the TrigFlow output (inverse of :func:`F_from_rf_velocity`)."""
    sb = _bcast(s, x_fm)
    return (F * jnp.sqrt(sb**2 + (1 - sb) ** 2) - (1 - 2 * sb) * x_fm) / (1 - 2 * sb + 2 * sb**2)
