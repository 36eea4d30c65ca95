"""The teacher's PF-ODE solvers (reference §1.2; EDM Alg. 1): DDIM/Euler and EDM Heun.

Pure functions of ``(apply_fn, params, key or x, ...)`` in the shared ``ApplyFn`` convention
(``scm_jax.guidance``), with classifier-free guidance; one ``lax.scan`` per run. See
``scm_jax.sampling``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import trigflow
from scm_jax.guidance import ApplyFn, guided_F
from scm_jax.sampling.consistency import _batch

Array = jax.Array

# Arguments that must be static when jitting the solvers directly.
ODE_STATIC = ("apply_fn", "shape", "num_steps", "sigma_d", "solver", "sigma_min", "sigma_max",
              "rho", "dtype")  # fmt: skip
ODE_FROM_STATIC = ("apply_fn", "num_steps", "sigma_d", "solver", "sigma_min", "rho")
_SOLVERS = ("euler", "heun")


def edm_times(
    num_steps: int,
    sigma_d: float,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> np.ndarray:
    """EDM's rho-schedule converted to TrigFlow times, then a final 0.

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
    i < N (sigma_0 = sigma_max only when N = 1), t_i = arctan(sigma_i / sigma_d), t_N = 0.

    Returns:
      numpy float64 ``(num_steps + 1,)``, strictly decreasing from arctan(sigma_max / sigma_d).
    """
    if num_steps < 1:
        raise ValueError(f"edm_times needs num_steps >= 1; got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min!r}, {sigma_max!r}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho!r}")
    i = np.arange(num_steps, dtype=np.float64)
    frac = i / max(num_steps - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigma = (hi + frac * (lo - hi)) ** rho
    return np.append(np.arctan(sigma / sigma_d), 0.0)


def ode_nfe(num_steps: int, solver: str = "heun") -> int:
    """Evaluations of (guided) F: N for Euler, 2N - 1 for Heun (the last step is Euler only)."""
    if solver not in _SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; expected one of {_SOLVERS}")
    return num_steps if solver == "euler" else 2 * num_steps - 1


def _stage_index(n: int, solver: str) -> tuple[np.ndarray, ...]:
    """Per-evaluation indices into an (N + 1)-time grid (eval, start, end) and is_predictor."""
    rows = []
    for i in range(n):
        rows.append((i, i, i + 1, 1.0))
        if solver == "heun" and i < n - 1:
            rows.append((i + 1, i, i + 1, 0.0))
    cols = tuple(np.array(col) for col in zip(*rows, strict=True))
    return cols[0].astype(int), cols[1].astype(int), cols[2].astype(int), cols[3]


def _stage_tables(t: np.ndarray, solver: str) -> tuple[np.ndarray, ...]:
    """Per-evaluation (t_eval, t_start, t_end, is_predictor) for the unified solver loop."""
    i_eval, i_start, i_end, is_pred = _stage_index(len(t) - 1, solver)
    return t[i_eval], t[i_start], t[i_end], is_pred


def sample_ode(
    apply_fn: ApplyFn,
    params: Any,
    key_or_x: Array,
    shape: tuple[int, ...],
    num_steps: int,
    sigma_d: float,
    solver: str = "heun",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    labels: Array | None = None,
    guidance_scale: Array | float | None = None,
    dtype: Any = jnp.float32,
) -> tuple[Array, int]:
    """Integrate the teacher's PF-ODE dx_t/dt = sigma_d F from t_max = arctan(sigma_max / sigma_d).

    Times are :func:`edm_times`. ``"euler"`` is the DDIM step ``trigflow.ddim_step`` (EDM's Euler
    step in x_sigma = x_t / cos t, exact for a point mass). ``"heun"`` is EDM's Heun sampler (=
    DPM-Solver-2S with Heun's intermediate point, reference §1.2): with eps = d = (x_sigma - D) /
    sigma = (sin t x_t + cos t sigma_d F) / sigma_d, the trapezoid correction
    x_sigma' = x_sigma + (sigma' - sigma)(eps + eps') / 2 becomes, in TrigFlow variables,
    x_t' = ddim_step(x_t, t, t', F) + sigma_d sin(t' - t) / cos(t) (eps' - eps) / 2; the last step
    (to t = 0) is Euler only, so nfe = 2N - 1 (EDM: 18 steps -> 35).

    One ``lax.scan`` over the nfe evaluations (one network trace). Jit with
    ``static_argnames=ODE_STATIC`` or use :func:`make_ode_sampler`.

    Args:
      apply_fn, params: the teacher F (``ApplyFn`` convention), called with ``key=None``.
      key_or_x: a PRNG key (x_{t_max} = ``trigflow.sample_noise(key, shape, sigma_d, dtype)``)
        or the initial x_{t_max} itself, float of ``shape``.
      shape: ``(B, ...)`` sample shape (static).
      num_steps: N >= 1 steps (static).
      sigma_d: data std.
      solver: ``"heun"`` or ``"euler"`` (static).
      sigma_min, sigma_max, rho: EDM schedule (static).
      labels: int ``(B,)`` (or one-hot) labels passed to ``apply_fn``, or None.
      guidance_scale: if not None, classifier-free guidance ``guided_F`` with this scale (scalar
        or ``(B,)``); needs ``labels``. A guided evaluation is one ``apply_fn`` call on a doubled
        batch, i.e. two network evaluations per sample.
      dtype: dtype of the drawn noise (ignored when x is given: x's dtype is used).
    Returns:
      ``(x0, nfe)``: samples of ``shape``, and the number of (guided) F evaluations as a Python
      int (network evaluations per sample are 2 nfe with guidance). Under a plain ``jax.jit`` of
      this function nfe comes back as a 0-d array; :func:`make_ode_sampler` returns it as an int.
    Raises:
      ValueError: bad solver, step count, schedule, initial shape, or guidance without labels.
    """
    nfe = ode_nfe(num_steps, solver)
    t_grid = edm_times(num_steps, sigma_d, sigma_min, sigma_max, rho)
    if guidance_scale is not None and labels is None:
        raise ValueError("guidance_scale needs labels (got labels=None)")
    key_or_x = jnp.asarray(key_or_x) if not isinstance(key_or_x, jax.Array) else key_or_x
    if jnp.issubdtype(key_or_x.dtype, jnp.floating):
        if tuple(key_or_x.shape) != tuple(shape):
            raise ValueError(f"initial x has shape {key_or_x.shape}; expected {tuple(shape)}")
        x = key_or_x
    else:
        x = trigflow.sample_noise(key_or_x, tuple(shape), sigma_d, dtype)
    rows = tuple(jnp.asarray(col, x.dtype) for col in _stage_tables(t_grid, solver))
    return _integrate(apply_fn, params, x, rows, sigma_d, labels, guidance_scale), nfe


def _integrate(
    apply_fn: ApplyFn, params: Any, x: Array, rows: tuple[Array, ...], sigma_d: float,
    labels: Array | None, guidance_scale: Array | float | None,
) -> Array:  # fmt: skip
    """The solver loop shared by :func:`sample_ode` and :func:`solve_ode_from`: one ``lax.scan``
    over the stage table ``rows`` = (t_eval, t_start, t_end, is_predictor), each ``(nfe,)``
    (one schedule for the batch) or ``(nfe, B)`` (a schedule per sample)."""
    dtype, b = x.dtype, x.shape[0]

    def F_fn(x_t, t):
        tb = _batch(t, b, dtype)
        if guidance_scale is None:
            return apply_fn(params, x_t / sigma_d, tb, labels)
        return guided_F(apply_fn, params, x_t / sigma_d, tb, labels, guidance_scale)

    def stage(carry, row):
        x_eval, eps_prev = carry
        t_eval, t_start, t_end, is_pred = row
        F = F_fn(x_eval, t_eval)
        eps = trigflow.predict_noise(x_eval, t_eval, F, sigma_d) / sigma_d
        x_pred = trigflow.ddim_step(x_eval, t_eval, t_end, F, sigma_d)  # t_eval = t_start here
        corr = sigma_d * jnp.sin(t_end - t_start) / jnp.cos(t_start) / 2
        corr = corr.reshape(corr.shape + (1,) * (x.ndim - corr.ndim))
        x_corr = x_eval + corr * (eps - eps_prev)  # x_eval is the predictor's x at t_end here
        pred = (is_pred > 0).reshape(is_pred.shape + (1,) * (x.ndim - is_pred.ndim))
        return (jnp.where(pred, x_pred, x_corr), jnp.where(pred, eps, eps_prev)), None

    (x0, _), _ = jax.lax.scan(stage, (x, jnp.zeros_like(x)), rows)
    return x0


def edm_times_from(
    t: Array, num_steps: int, sigma_d: float, sigma_min: float = 0.002, rho: float = 7.0
) -> Array:
    """EDM's rho-schedule from each start time ``t`` down to ``sigma_min``, then a final 0.

    Like :func:`edm_times` with sigma_max = sigma_d tan(t), but traced (``t`` is data, so one
    compiled solver serves every start time): sigma_i = (sigma_t^(1/rho) + i / (N - 1)
    (sigma_lo^(1/rho) - sigma_t^(1/rho)))^rho for i < N, sigma_lo = min(sigma_min, sigma_t) (a
    start below sigma_min takes N - 1 zero-length steps at sigma_t, then the step to 0),
    t_i = arctan(sigma_i / sigma_d), t_N = 0; t_0 = t exactly.

    Args:
      t: ``(B,)`` start times in (0, pi/2), float.
      num_steps: N >= 1 (static).
    Returns:
      ``(num_steps + 1, B)`` times in the dtype of ``t``, non-increasing down each column.
    """
    if num_steps < 1:
        raise ValueError(f"edm_times_from needs num_steps >= 1; got {num_steps}")
    if not rho > 0 or not sigma_min > 0:
        raise ValueError(f"need sigma_min > 0 and rho > 0; got {sigma_min!r}, {rho!r}")
    t = jnp.asarray(t)
    sigma_t = trigflow.sigma_from_t(t, sigma_d)
    hi = sigma_t ** (1 / rho)
    lo = jnp.minimum(jnp.asarray(sigma_min, t.dtype), sigma_t) ** (1 / rho)
    frac = (jnp.arange(num_steps, dtype=t.dtype) / max(num_steps - 1, 1))[:, None]
    times = trigflow.t_from_sigma((hi + frac * (lo - hi)) ** rho, sigma_d)
    times = times.at[0].set(t)  # the start exactly (arctan(tan t) rounds)
    return jnp.concatenate([times, jnp.zeros_like(t)[None]])


def solve_ode_from(
    apply_fn: ApplyFn,
    params: Any,
    x_t: Array,
    t: Array | float,
    num_steps: int,
    sigma_d: float,
    solver: str = "heun",
    sigma_min: float = 0.002,
    rho: float = 7.0,
    labels: Array | None = None,
    guidance_scale: Array | float | None = None,
) -> Array:
    """The teacher's PF-ODE endpoint from an arbitrary state: integrate x_t from time t to 0.

    The solver of :func:`sample_ode` (same steps, nfe = 2N - 1 for Heun) on the schedule
    :func:`edm_times_from` (EDM's rho-schedule from sigma_d tan(t) to ``sigma_min``, then 0), so
    ``solve_ode_from(..., x, t_max, ...)`` follows the same schedule as :func:`sample_ode` from x
    (up to the float32 rounding of the traced schedule). ``t`` is an array, not static: one
    compiled program serves every start time. Jit with ``static_argnames=ODE_FROM_STATIC``.

    Args:
      apply_fn, params: the teacher F (``ApplyFn`` convention), called with ``key=None``.
      x_t: ``(B, ...)`` float states at time ``t``.
      t: start time(s) in (0, pi/2): scalar or ``(B,)`` (each sample its own schedule).
      num_steps: N >= 1 solver steps (static).
      sigma_d: data std.
      solver: ``"heun"`` or ``"euler"`` (static).
      sigma_min, rho: EDM schedule (static).
      labels, guidance_scale: as :func:`sample_ode`.
    Returns:
      The endpoint x_0 estimate, shape and dtype of ``x_t``.
    Raises:
      ValueError: bad solver or step count, or guidance without labels.
    """
    ode_nfe(num_steps, solver)
    if guidance_scale is not None and labels is None:
        raise ValueError("guidance_scale needs labels (got labels=None)")
    b = x_t.shape[0]
    grid = edm_times_from(_batch(t, b, x_t.dtype), num_steps, sigma_d, sigma_min, rho)
    i_eval, i_start, i_end, is_pred = _stage_index(num_steps, solver)  # rows of (B,) times
    rows = (grid[i_eval], grid[i_start], grid[i_end], jnp.asarray(is_pred, x_t.dtype))
    return _integrate(apply_fn, params, x_t, rows, sigma_d, labels, guidance_scale)


def make_ode_sampler(
    apply_fn: ApplyFn,
    shape: tuple[int, ...],
    num_steps: int,
    sigma_d: float,
    solver: str = "heun",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    dtype: Any = jnp.float32,
) -> tuple[Callable[..., Array], int]:
    """(jitted ``sample(params, key_or_x, labels=None, guidance_scale=None) -> x0``, nfe).

    See :func:`sample_ode` for the arguments; the schedule and solver are validated now.
    """
    nfe = ode_nfe(num_steps, solver)
    edm_times(num_steps, sigma_d, sigma_min, sigma_max, rho)
    shape = tuple(int(s) for s in shape)

    def sample(params, key_or_x, labels=None, guidance_scale=None):
        return sample_ode(
            apply_fn, params, key_or_x, shape, num_steps, sigma_d, solver, sigma_min, sigma_max,
            rho, labels, guidance_scale, dtype,
        )[0]  # fmt: skip

    return jax.jit(sample), nfe
