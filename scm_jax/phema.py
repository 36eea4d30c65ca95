"""EDM2 post-hoc EMA: the power-function EMA of any sigma_rel, reconstructed from snapshots.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2),
§3.2 and App. C. Pure numpy functions (float64); ``scm_jax.export.posthoc`` applies them to the
snapshots a run writes (``scm_jax.run.snapshots``) behind ``scm-jax phema``.

**The profile of a snapshot.** Training time counts images; step k (k = 1, 2, ...) brings the
count to n_k = k B (batch B) and the parameters to theta_k. Our power-function EMA
(``scm_jax.ema``, EDM2 Eq. 127) is e_K = beta_K e_(K-1) + (1 - beta_K) theta_K with
beta_k = (1 - B / n_k)^(gamma + 1) = ((k - 1) / k)^a, a = gamma + 1. Since beta_1 = 0, unrolling
gives exactly::

    e_K = sum_{k=1..K} w_K(k) theta_k,   w_K(k) = (k^a - (k - 1)^a) / K^a        (sum_k w_K(k) = 1)

(``tests/ema_test.py`` checks this against the update). w_K(k) is EDM2's continuous profile
p(t; T) = a t^gamma / T^a on 0 < t <= T = K B (EDM2 App. C) integrated over the images of step k,
so it is the continuous profile seen by parameters that are constant within a step.

**Least squares (EDM2 App. C.3, Alg. 3).** Given snapshots e_i (profile w_i, exponent gamma_i,
step K_i), the target profile w_r is approximated by sum_i x_i w_i with x minimising
||w_r - sum_i x_i w_i||^2 over the steps: A x = b with A_ij = <w_i, w_j>, b_i = <w_i, w_r>, and
then x / sum(x) (EDM2's normalisation: the weights of the result sum to 1). The reconstruction is
sum_i x_i e_i. We use the exact discrete inner products <w_i, w_j> = sum_k w_i(k) w_j(k)
(:func:`inner_products`): with w(k) = B p(t_k) + O(B^2) they are B int p_i p_j dt + ..., i.e.
1/B times them tends to EDM2's closed form (Eq. 151, :func:`continuous_inner_products`) as the
steps grow (a common factor, which the solve ignores), so for long runs the two solves agree;
for short ones (tests, early snapshots) ours is the exact least squares of the weights our
update applies: a stored profile at a stored time is reconstructed as that snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from scm_jax.ema import power_exponent

_CHUNK = 1 << 20  # steps per vectorised block of an inner-product sum


def step_profile(gamma: float, step: int) -> np.ndarray:
    """The weights w_K(k), k = 1..K, of the parameters after each step in the power EMA at step
    K = ``step`` (the exact discrete profile, see the module docstring).

    Returns:
      (K,) float64, non-negative, summing to 1.
    """
    k = np.arange(1, int(step) + 1, dtype=np.float64)
    return _scaled_increments(np.asarray([gamma + 1.0]), k, float(step))[0]


def continuous_profile(gamma: float, t: np.ndarray, t_snapshot: float) -> np.ndarray:
    """EDM2's continuous power-function profile p(t; T) = (gamma + 1) t^gamma / T^(gamma + 1) on
    0 < t <= T (0 elsewhere), T = ``t_snapshot``; the density whose integral over each step's
    images is :func:`step_profile`.

    Args:
      t: times (images), any shape. Returns: float64 of ``t``'s shape.
    """
    t = np.asarray(t, np.float64)
    inside = (t > 0) & (t <= t_snapshot)
    return np.where(inside, (gamma + 1) * np.clip(t, 0, t_snapshot) ** gamma, 0.0) / (
        t_snapshot ** (gamma + 1)
    )


def _scaled_increments(a: np.ndarray, k: np.ndarray, hi: float) -> np.ndarray:
    """(k^a - (k - 1)^a) / hi^a for exponents ``a`` (P,) and steps ``k`` (L,) <= hi, as
    (k / hi)^a (1 - (1 - 1/k)^a) (no overflow, no cancellation): (P, L) float64 in [0, 1]."""
    with np.errstate(divide="ignore"):  # k = 1: log1p(-1) = -inf, so the bracket is 1
        bracket = -np.expm1(a[:, None] * np.log1p(-1.0 / k[None, :]))
    return (k[None, :] / hi) ** a[:, None] * bracket


def _vectors(gamma: Any, step: Any) -> tuple[np.ndarray, np.ndarray]:
    g = np.atleast_1d(np.asarray(gamma, np.float64))
    s = np.atleast_1d(np.asarray(step))
    g, s = np.broadcast_arrays(g, s)
    if g.ndim != 1:
        raise ValueError(f"gamma and step must be scalars or 1-D, got shape {g.shape}")
    if not np.issubdtype(s.dtype, np.integer) and not np.all(s == np.round(s)):
        raise ValueError(f"steps must be whole numbers, got {s}")
    s = s.astype(np.int64)
    if np.any(s < 1) or np.any(g <= 0):
        raise ValueError(f"steps must be >= 1 and gamma > 0 (got steps {s}, gamma {g})")
    return g, s


def inner_products(gamma_a: Any, step_a: Any, gamma_b: Any, step_b: Any) -> np.ndarray:
    """Exact inner products <w_a, w_b> = sum_k w_a(k) w_b(k) of discrete power profiles.

    Args:
      gamma_a, step_a: exponents (float) and steps (int >= 1) of N profiles (scalars or (N,),
        broadcast); gamma_b, step_b: the same for M profiles.
    Returns:
      (N, M) float64.

    Cost O(max step x P^2 + (N + M)^2 x (N + M)) with P the number of distinct exponents: the
    sum over k is split at every step in ``step_a``/``step_b`` (segments (K_(m-1), K_m]); within
    a segment w_i(k) = v(k) (K_m / K_i)^a_i with v(k) = (k^a - (k-1)^a) / K_m^a, so each
    segment's sums of v_p v_q serve every pair whose steps are >= K_m.
    """
    ga, sa = _vectors(gamma_a, step_a)
    gb, sb = _vectors(gamma_b, step_b)
    gammas = np.unique(np.concatenate([ga, gb]))
    pa, pb = np.searchsorted(gammas, ga), np.searchsorted(gammas, gb)
    breaks = np.unique(np.concatenate([sa, sb]))  # (S,) ascending
    a = gammas + 1.0
    seg = np.zeros((len(breaks), len(gammas), len(gammas)))  # per segment: sum_k v_p v_q
    lo = 0
    for m, hi in enumerate(breaks):
        for start in range(lo + 1, int(hi) + 1, _CHUNK):
            k = np.arange(start, min(start + _CHUNK, int(hi) + 1), dtype=np.float64)
            v = _scaled_increments(a, k, float(hi))
            seg[m] += v @ v.T
        lo = int(hi)

    def scales(g: np.ndarray, s: np.ndarray) -> np.ndarray:  # (S, n): (K_m / K_i)^a_i, K_m <= K_i
        ratio = breaks[:, None] / s[None, :].astype(np.float64)
        return np.where(ratio <= 1.0, np.minimum(ratio, 1.0) ** (g[None, :] + 1.0), 0.0)

    sca, scb = scales(ga, sa), scales(gb, sb)
    out = np.zeros((len(ga), len(gb)))
    for p in range(len(gammas)):
        for q in range(len(gammas)):
            i, j = np.flatnonzero(pa == p), np.flatnonzero(pb == q)
            if len(i) and len(j):
                out[np.ix_(i, j)] = (sca[:, i] * seg[:, p, q][:, None]).T @ scb[:, j]
    return out


def continuous_inner_products(
    gamma_a: Any, t_a: Any, gamma_b: Any, t_b: Any
) -> np.ndarray:  # fmt: skip
    """EDM2's closed form (App. C, Eq. 151) of the continuous profiles' inner products
    int p(t; T_a) p(t; T_b) dt = (g_a + 1)(g_b + 1) / (g_a + g_b + 1) (T_lo / T_hi)^g_hi / T_hi,
    where T_hi is the later snapshot time and g_hi its exponent.

    Args:
      gamma_a, t_a: (N,) exponents and times (images); gamma_b, t_b: (M,).
    Returns:
      (N, M) float64; ``inner_products(...) / batch`` tends to it as the steps grow.
    """
    ga = np.atleast_1d(np.asarray(gamma_a, np.float64))[:, None]
    ta = np.atleast_1d(np.asarray(t_a, np.float64))[:, None]
    gb = np.atleast_1d(np.asarray(gamma_b, np.float64))[None, :]
    tb = np.atleast_1d(np.asarray(t_b, np.float64))[None, :]
    g_hi = np.where(ta < tb, gb, ga)
    t_lo, t_hi = np.minimum(ta, tb), np.maximum(ta, tb)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * (t_lo / t_hi) ** g_hi / t_hi


class Solution(NamedTuple):
    """Post-hoc EMA coefficients and how well they reconstruct each target profile."""

    coefficients: np.ndarray  # (N, M) float64: snapshot i's weight in target j; columns sum to 1
    error: np.ndarray  # (M,) ||w_r - sum_i x_i w_i|| / ||w_r|| (0: exact)


def solve_coefficients(
    sigma_in: Sequence[float] | np.ndarray, step_in: Sequence[int] | np.ndarray,
    sigma_out: Sequence[float] | np.ndarray, step_out: Sequence[int] | np.ndarray,
) -> Solution:  # fmt: skip
    """EDM2's least-squares solve (App. C.3, Alg. 3) for the snapshot weights of target EMAs.

    Args:
      sigma_in, step_in: (N,) relative width sigma_rel (EDM2 Eq. 3) and step of each snapshot
        profile (a snapshot of two EMAs is two entries at one step).
      sigma_out, step_out: (M,) the targets (sigma_rel in (0, 12^-0.5), step >= 1; scalars
        broadcast).
    Returns:
      :class:`Solution`: coefficients X (N, M) with sum_i X_ij = 1 (EDM2's normalisation) and
      the relative L2 error of each reconstructed profile.
    """
    gi = np.asarray([power_exponent(float(s)) for s in np.atleast_1d(sigma_in)])
    go = np.asarray([power_exponent(float(s)) for s in np.atleast_1d(sigma_out)])
    gi, si = _vectors(gi, step_in)
    go, so = _vectors(go, step_out)
    A = inner_products(gi, si, gi, si)  # (N, N)
    B = inner_products(gi, si, go, so)  # (N, M)
    d = np.sqrt(np.diag(A))  # Jacobi scaling: entries ~ 1/K span orders of magnitude
    x = np.linalg.lstsq(A / np.outer(d, d), B / d[:, None], rcond=None)[0] / d[:, None]
    x = x / np.sum(x, axis=0, keepdims=True)
    rr = np.diag(inner_products(go, so, go, so))
    resid = rr - 2 * np.sum(x * B, axis=0) + np.einsum("im,ij,jm->m", x, A, x)
    return Solution(x, np.sqrt(np.maximum(resid, 0.0) / rr))


def weighted_sum(
    trees: Sequence[Any], coefficients: Sequence[float] | np.ndarray, dtype: Any = None
) -> Any:
    """sum_i c_i tree_i leaf by leaf, accumulated in float64.

    Args:
      trees: N pytrees of the same structure and shapes (numpy or jax arrays; a bare array is
        a tree of one leaf).
      coefficients: (N,) floats (a column of :attr:`Solution.coefficients`).
      dtype: the result's dtype (None: each leaf's dtype in ``trees[0]``).
    Returns:
      A tree like ``trees[0]`` of numpy arrays.
    """
    coefficients = np.asarray(coefficients, np.float64)
    if len(trees) != len(coefficients) or not len(trees):
        raise ValueError(f"{len(trees)} trees but {len(coefficients)} coefficients")

    def leaf(*xs: Any) -> np.ndarray:
        acc = np.zeros(np.shape(xs[0]), np.float64)
        for c, x in zip(coefficients, xs, strict=True):
            acc += c * np.asarray(x, np.float64)
        return acc.astype(np.asarray(xs[0]).dtype if dtype is None else dtype)

    return jax.tree.map(leaf, *trees)
