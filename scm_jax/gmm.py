"""Isotropic Gaussian-mixture data and its exact TrigFlow teacher (reference §1.1-1.2).

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I) in R^D and noise z ~ N(0, sigma_d^2 I). Given component k,
(x0, z, x_t) are jointly Gaussian with x_t = cos t x0 + sin t z ~ N(cos t mu_k, v_k I),

    v_k(t) = cos^2 t s_k^2 + sin^2 t sigma_d^2,
    E[x0 | x_t, k] = mu_k + cos t s_k^2 / v_k (x_t - cos t mu_k),
    E[z  | x_t, k] = sin t sigma_d^2 / v_k (x_t - cos t mu_k),

and the mixture quantities are averages over the responsibilities r_k(x_t) (computed with
log-sum-exp). Everything is finite on all of t in [0, pi/2] because every s_k > 0.

Shapes: ``x_t`` is ``(B, D)``, ``t`` a scalar or ``(B,)``; results have the dtype of ``x_t``. The
mixture is a hashable frozen dataclass, passed to the jitted functions as a static argument (its
few numbers become constants of the compiled program).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.guidance import ApplyFn

Array = jax.Array

__all__ = [
    "GaussianMixture",
    "combine",
    "conditional_teacher_apply_fn",
    "flow_map",
    "grid_mixture",
    "log_prob",
    "posterior_x0",
    "posterior_z",
    "ring_mixture",
    "score",
    "teacher_apply_fn",
    "velocity",
]


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """x0 ~ sum_k weights[k] N(means[k], stds[k]^2 I): K isotropic components in R^D.

    Attributes (array-likes are accepted and stored as tuples of floats, so the mixture is
    hashable and can be a static ``jax.jit`` argument):
      means: ``(K, D)`` component means.
      stds: ``(K,)`` per-component standard deviations, all > 0.
      weights: ``(K,)`` positive mixture weights summing to 1 (within 1e-6; renormalised).
    """

    means: Any
    stds: Any
    weights: Any

    def __post_init__(self) -> None:
        means = np.asarray(self.means, np.float64)
        stds = np.asarray(self.stds, np.float64)
        weights = np.asarray(self.weights, np.float64)
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"GaussianMixture means must have shape (K, D); got {means.shape}")
        k = means.shape[0]
        if stds.shape != (k,):
            raise ValueError(f"GaussianMixture stds must have shape ({k},); got {stds.shape}")
        if weights.shape != (k,):
            raise ValueError(f"GaussianMixture weights must have shape ({k},); got {weights.shape}")
        if not np.all(np.isfinite(means)):
            raise ValueError(f"GaussianMixture means must be finite; got {means.tolist()}")
        if not np.all(np.isfinite(stds) & (stds > 0)):
            raise ValueError(f"GaussianMixture stds must be finite and > 0; got {stds.tolist()}")
        if not np.all(np.isfinite(weights) & (weights > 0)):
            raise ValueError(f"GaussianMixture weights must be > 0; got {weights.tolist()}")
        if abs(weights.sum() - 1.0) > 1e-6:
            raise ValueError(
                f"GaussianMixture weights must sum to 1; got sum {float(weights.sum())!r} "
                f"for {weights.tolist()}"
            )
        weights = weights / weights.sum()
        object.__setattr__(self, "means", tuple(tuple(float(v) for v in m) for m in means))
        object.__setattr__(self, "stds", tuple(float(v) for v in stds))
        object.__setattr__(self, "weights", tuple(float(v) for v in weights))

    @property
    def dim(self) -> int:
        """Data dimension D."""
        return len(self.means[0])

    @property
    def num_components(self) -> int:
        """Number of components K."""
        return len(self.stds)

    def arrays(self, dtype: Any = jnp.float32) -> tuple[Array, Array, Array]:
        """(means ``(K, D)``, stds ``(K,)``, weights ``(K,)``) as jax arrays of ``dtype``."""
        return (
            jnp.asarray(self.means, dtype),
            jnp.asarray(self.stds, dtype),
            jnp.asarray(self.weights, dtype),
        )

    def sample_with_components(
        self, key: Array, n: int, dtype: Any = jnp.float32
    ) -> tuple[Array, Array]:
        """Draw ``n`` samples: (x0 ``(n, D)`` of ``dtype``, component index ``(n,)`` int32)."""
        return _sample(self, key, int(n), jnp.dtype(dtype))

    def sample(self, key: Array, n: int, dtype: Any = jnp.float32) -> Array:
        """Draw ``n`` samples x0 ``(n, D)`` of ``dtype``."""
        return self.sample_with_components(key, n, dtype)[0]

    def mean(self) -> np.ndarray:
        """Exact mean sum_k w_k mu_k, numpy float64 ``(D,)``."""
        return np.asarray(self.weights) @ np.asarray(self.means)

    def cov(self) -> np.ndarray:
        """Exact covariance sum_k w_k (s_k^2 I + mu_k mu_k^T) - m m^T, numpy float64 ``(D, D)``."""
        mu, w, s = np.asarray(self.means), np.asarray(self.weights), np.asarray(self.stds)
        m = w @ mu
        second = np.einsum("k,ki,kj->ij", w, mu, mu) + np.sum(w * s**2) * np.eye(self.dim)
        return second - np.outer(m, m)

    def data_std(self) -> float:
        """Per-element data std sqrt(trace(cov) / D) (compare with sigma_d)."""
        return math.sqrt(float(np.trace(self.cov())) / self.dim)

    def to_dict(self) -> dict[str, list]:
        """JSON-serialisable ``{'means': [[...]], 'stds': [...], 'weights': [...]}``."""
        return {
            "means": [list(m) for m in self.means],
            "stds": list(self.stds),
            "weights": list(self.weights),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GaussianMixture:
        """Inverse of :meth:`to_dict` (extra keys are an error)."""
        extra = sorted(set(d) - {"means", "stds", "weights"})
        if extra:
            raise ValueError(f"unknown GaussianMixture key(s) {extra}")
        return cls(means=d["means"], stds=d["stds"], weights=d["weights"])


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _sample(gmm: GaussianMixture, key: Array, n: int, dtype: Any) -> tuple[Array, Array]:
    means, stds, weights = gmm.arrays(dtype)
    k_comp, k_noise = jax.random.split(key)
    k = jax.random.categorical(k_comp, jnp.log(weights), shape=(n,)).astype(jnp.int32)
    eps = jax.random.normal(k_noise, (n, gmm.dim), dtype)
    return means[k] + stds[k][:, None] * eps, k


def ring_mixture(
    num_components: int = 8, radius: float = 0.65, std: float = 0.15, dim: int = 2
) -> GaussianMixture:
    """K equal-weight components with means on a circle of ``radius`` in the first two coordinates.

    Other coordinates of the means are 0. For K >= 3 the mean is 0 and the per-element data std is
    sqrt((radius^2 + D std^2) / D): 0.4835 with the defaults (close to sigma_d = 0.5).
    """
    if num_components < 1:
        raise ValueError(f"ring_mixture needs num_components >= 1; got {num_components}")
    if dim < 2:
        raise ValueError(f"ring_mixture needs dim >= 2; got {dim}")
    angle = 2 * np.pi * np.arange(num_components) / num_components
    means = np.zeros((num_components, dim))
    means[:, 0], means[:, 1] = radius * np.cos(angle), radius * np.sin(angle)
    k = num_components
    return GaussianMixture(means=means, stds=np.full(k, std), weights=np.full(k, 1.0 / k))


def grid_mixture(n: int = 5, extent: float = 0.6, std: float = 0.05) -> GaussianMixture:
    """n x n equal-weight 2-D components with means on [-extent, extent]^2 (a mode-coverage test:
    25 narrow modes 6 stds apart with the defaults; per-element data std 0.427)."""
    if n < 1 or not extent > 0:
        raise ValueError(f"grid_mixture needs n >= 1 and extent > 0; got {n}, {extent}")
    g = np.linspace(-extent, extent, n) if n > 1 else np.zeros(1)
    means = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    return GaussianMixture(means=means, stds=np.full(n * n, std), weights=np.full(n * n, 1 / n**2))


def combine(gmms: Sequence[GaussianMixture], probs: Sequence[float]) -> GaussianMixture:
    """The mixture sum_c probs[c] gmms[c] (e.g. the unconditional law of class mixtures)."""
    if len(gmms) != len(probs) or not gmms:
        raise ValueError(f"combine needs one prob per mixture; got {len(gmms)} and {len(probs)}")
    if len({g.dim for g in gmms}) != 1:
        raise ValueError(f"combine needs mixtures of one dimension; got {[g.dim for g in gmms]}")
    return GaussianMixture(
        means=[m for g in gmms for m in g.means],
        stds=[s for g in gmms for s in g.stds],
        weights=[p * w for g, p in zip(gmms, probs, strict=True) for w in g.weights],
    )


# ---------------------------------------------------------------------------------------------
# Exact posterior quantities of x_t = cos t x0 + sin t z


def _components(gmm: GaussianMixture, x_t: Array, t: Array | float, sigma_d: float):
    """Per-component (log w_k N_k (B, K), x_t - c mu_k (B, K, D), v_k, cos t, sin t)."""
    if x_t.ndim != 2 or x_t.shape[1] != gmm.dim:
        raise ValueError(f"x_t must have shape (B, {gmm.dim}); got {x_t.shape}")
    dtype = x_t.dtype
    means, stds, weights = gmm.arrays(dtype)
    t = jnp.asarray(t, dtype)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x_t.shape[0])):
        raise ValueError(f"t must be a scalar or have shape ({x_t.shape[0]},); got {t.shape}")
    t = t.reshape(-1)  # (1,) for a scalar t: the per-time terms below are then computed once
    c, s = jnp.cos(t)[:, None], jnp.sin(t)[:, None]  # (B or 1, 1)
    v = c**2 * stds**2 + s**2 * sigma_d**2  # (B or 1, K)
    diff = x_t[:, None, :] - c[:, :, None] * means  # (B, K, D)
    log_n = -0.5 * (jnp.sum(diff**2, -1) / v + gmm.dim * jnp.log(2 * jnp.pi * v))
    log_joint = jnp.log(weights) + log_n
    return log_joint, diff, v, c, s


def _posteriors(gmm, x_t, t, sigma_d) -> tuple[Array, Array]:
    log_joint, diff, v, c, s = _components(gmm, x_t, t, sigma_d)
    r = jax.nn.softmax(log_joint, axis=-1)[..., None]  # (B, K, 1)
    means, stds, _ = gmm.arrays(x_t.dtype)
    e_x0 = jnp.sum(r * (means + (c * stds**2 / v)[..., None] * diff), axis=1)
    e_z = jnp.sum(r * ((s * sigma_d**2 / v)[..., None] * diff), axis=1)
    return e_x0, e_z


@functools.partial(jax.jit, static_argnames=("gmm",))
def posterior_x0(gmm: GaussianMixture, x_t: Array, t: Array | float, sigma_d: float) -> Array:
    """E[x0 | x_t] ``(B, D)`` (the ideal denoiser); x_t ``(B, D)`` float, t scalar or ``(B,)``."""
    return _posteriors(gmm, x_t, t, sigma_d)[0]


@functools.partial(jax.jit, static_argnames=("gmm",))
def posterior_z(gmm: GaussianMixture, x_t: Array, t: Array | float, sigma_d: float) -> Array:
    """E[z | x_t] ``(B, D)``; x_t ``(B, D)`` float, t scalar or ``(B,)``."""
    return _posteriors(gmm, x_t, t, sigma_d)[1]


@functools.partial(jax.jit, static_argnames=("gmm",))
def velocity(gmm: GaussianMixture, x_t: Array, t: Array | float, sigma_d: float) -> Array:
    """PF-ODE velocity E[cos t z - sin t x0 | x_t] = dx_t/dt, ``(B, D)`` in the dtype of x_t.

    The exact teacher's sigma_d F; x_t ``(B, D)``, t scalar or ``(B,)`` in [0, pi/2].
    """
    # cos t E[z | x_t, k] - sin t E[x0 | x_t, k] = cos t sin t (sigma_d^2 - s_k^2) / v_k
    # (x_t - cos t mu_k) - sin t mu_k, averaged over the responsibilities (one pass, no posteriors).
    log_joint, diff, v, c, s = _components(gmm, x_t, t, sigma_d)
    r = jax.nn.softmax(log_joint, axis=-1)  # (B, K)
    means, stds, _ = gmm.arrays(x_t.dtype)
    coef = r * (c * s) * (sigma_d**2 - stds**2) / v
    return jnp.einsum("bk,bkd->bd", coef, diff) - s * (r @ means)


@functools.partial(jax.jit, static_argnames=("gmm",))
def score(gmm: GaussianMixture, x_t: Array, t: Array | float, sigma_d: float) -> Array:
    """grad_x log p_t(x_t) = -sum_k r_k (x_t - cos t mu_k) / v_k, ``(B, D)``.

    Equals -E[z | x_t] / (sin t sigma_d^2) for t > 0 (Tweedie).
    """
    log_joint, diff, v, _, _ = _components(gmm, x_t, t, sigma_d)
    r = jax.nn.softmax(log_joint, axis=-1)
    return -jnp.sum((r / v)[..., None] * diff, axis=1)


@functools.partial(jax.jit, static_argnames=("gmm",))
def log_prob(gmm: GaussianMixture, x_t: Array, t: Array | float, sigma_d: float) -> Array:
    """log p_t(x_t) ``(B,)`` of the noised mixture; x_t ``(B, D)``, t scalar or ``(B,)``."""
    log_joint = _components(gmm, x_t, t, sigma_d)[0]
    return jax.nn.logsumexp(log_joint, axis=-1)


def teacher_apply_fn(gmm: GaussianMixture, sigma_d: float) -> ApplyFn:
    """The exact teacher F(x_t / sigma_d, t) = velocity(x_t, t) / sigma_d as an ``ApplyFn``.

    The returned ``apply_fn(params, x_scaled, t, labels=None, guidance=None, key=None)`` ignores
    ``params``, ``labels``, ``guidance`` and ``key``; ``x_scaled`` is ``(B, D)`` (or ``(B, ...)``
    with D elements per sample), ``t`` ``(B,)``; F has the shape and dtype of ``x_scaled``.
    """

    def apply_fn(params, x_scaled, t, labels=None, guidance=None, key=None):
        del params, labels, guidance, key
        x = x_scaled.reshape(x_scaled.shape[0], -1) * sigma_d
        return (velocity(gmm, x, t, sigma_d) / sigma_d).reshape(x_scaled.shape)

    return apply_fn


def conditional_teacher_apply_fn(
    class_gmms: Sequence[GaussianMixture],
    sigma_d: float,
    class_probs: Sequence[float] | None = None,
) -> ApplyFn:
    """Exact class-conditional teacher: label y selects ``class_gmms[y]``.

    The null label (-1 for int labels, an all-zero row for one-hot ``(B, C)`` labels, or
    ``labels=None``) selects the unconditional law ``combine(class_gmms, class_probs)`` (uniform
    class probabilities by default), so ``scm_jax.guidance.guided_F`` gives exact CFG fields.
    Shapes and the ignored arguments as in :func:`teacher_apply_fn`.
    """
    num_classes = len(class_gmms)
    if class_probs is None:
        class_probs = [1.0 / num_classes] * num_classes
    gmms = (*class_gmms, combine(class_gmms, class_probs))

    def apply_fn(params, x_scaled, t, labels=None, guidance=None, key=None):
        del params, guidance, key
        b = x_scaled.shape[0]
        x = x_scaled.reshape(b, -1) * sigma_d
        if labels is None:
            idx = jnp.full((b,), num_classes, jnp.int32)
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            idx = jnp.where(labels < 0, num_classes, labels)
        else:
            null = jnp.all(labels == 0, axis=-1)
            idx = jnp.where(null, num_classes, jnp.argmax(labels, axis=-1))
        vs = jnp.stack([velocity(g, x, t, sigma_d) for g in gmms])  # (C + 1, B, D)
        v = jnp.take_along_axis(vs, idx[None, :, None], axis=0)[0]
        return (v / sigma_d).reshape(x_scaled.shape)

    return apply_fn


# ---------------------------------------------------------------------------------------------
# Exact PF-ODE flow map


@functools.partial(jax.jit, static_argnames=("gmm", "num_steps"))
def flow_map(
    gmm: GaussianMixture,
    x: Array,
    t_from: Array | float,
    t_to: Array | float,
    sigma_d: float,
    num_steps: int = 2000,
) -> Array:
    """Transport x from time ``t_from`` to ``t_to`` along the exact PF-ODE dx/dt = velocity.

    Classical RK4 on a uniform grid in t (``num_steps`` steps, one ``lax.fori_loop``), computed in
    float64 when x64 is enabled (float32 otherwise) and returned in the dtype of ``x``. The
    velocity is smooth on all of [0, pi/2] (every s_k > 0), so a uniform grid is well
    conditioned. Measured in float64 from pi/2 to 0 (``tests/toy_gmm_test.py``): max error 1e-13
    at 2000 steps for one Gaussian (closed form); 8e-6 / 6e-7 / 2e-9 at 50 / 100 / 400 steps for
    a 3-component mixture with stds 0.1-0.2 (fourth order). Narrower components need more steps.
    Phi(z) = ``flow_map(gmm, z, t_max, 0.0, sigma_d)`` is the exact teacher's sample for noise z.

    Args:
      gmm: the data mixture (static).
      x: ``(B, D)`` states at ``t_from``.
      t_from, t_to: scalars or ``(B,)`` times in [0, pi/2], either order.
      sigma_d: noise std.
      num_steps: RK4 steps (static, >= 1); 4 velocity evaluations each.
    Returns:
      ``(B, D)`` states at ``t_to``, dtype of ``x``.
    """
    if num_steps < 1:
        raise ValueError(f"flow_map needs num_steps >= 1; got {num_steps}")
    work = jax.dtypes.canonicalize_dtype(jnp.float64)
    y = x.astype(work)
    b = x.shape[0]
    t0, t1 = jnp.asarray(t_from, work).reshape(-1), jnp.asarray(t_to, work).reshape(-1)
    if t0.shape != t1.shape:  # scalar times stay (1,): the time terms are computed once per step
        t0, t1 = jnp.broadcast_to(t0, (b,)), jnp.broadcast_to(t1, (b,))
    h = (t1 - t0) / num_steps

    def f(y, t):
        return velocity(gmm, y, t, sigma_d)

    def body(i, y):
        t = t0 + i * h
        hb = h[:, None]
        k1 = f(y, t)
        k2 = f(y + 0.5 * hb * k1, t + 0.5 * h)
        k3 = f(y + 0.5 * hb * k2, t + 0.5 * h)
        k4 = f(y + hb * k3, t + h)
        return y + hb / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    return jax.lax.fori_loop(0, num_steps, body, y).astype(x.dtype)
