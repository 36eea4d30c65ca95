"""The multistep consistency sampler (sCM §4; Song et al. 2023, Alg. 1).

A pure function of ``(apply_fn, params, key, ...)`` in the shared ``ApplyFn`` convention
(``scm_jax.guidance``), one ``lax.scan`` over the sampling times; see ``scm_jax.sampling``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import trigflow
from scm_jax.guidance import ApplyFn

Array = jax.Array

# Arguments that must be static when jitting the sampler directly.
CONSISTENCY_STATIC = ("apply_fn", "shape", "times", "sigma_d", "dtype", "unroll")


def _batch(value: Array | float, b: int, dtype: Any) -> Array:
    """Broadcast a scalar or ``(B,)`` value to ``(B,)`` of ``dtype``."""
    return jnp.broadcast_to(jnp.asarray(value, dtype), (b,))


# ---------------------------------------------------------------------------------------------
# Consistency sampling (sCM §4; Song et al. 2023, Alg. 1)


def consistency_times(num_steps: int, t_max: float, t_mid: float = 1.1) -> tuple[float, ...]:
    """Sampling times of the multistep consistency sampler, strictly decreasing in (0, t_max].

    1 step -> ``(t_max,)``; 2 steps -> ``(t_max, t_mid)`` (sCM's fixed t_mid = 1.1); n > 2 steps
    -> ``t_max`` followed by n - 1 times evenly spaced in t from ``t_mid`` down to
    ``t_mid / (n - 1)`` (e.g. n = 3: ``(t_max, 1.1, 0.55)``). The spacing for n > 2 is this
    project's choice (the paper tunes only n <= 2); pass an explicit tuple to
    :func:`sample_consistency` for anything else.

    Args:
      num_steps: number of network evaluations, >= 1.
      t_max: first time, in (0, pi/2] (``trigflow.t_max(80, 0.5)`` = 1.56455).
      t_mid: second time, in (0, t_max).
    Returns:
      Tuple of ``num_steps`` Python floats.
    """
    if num_steps < 1:
        raise ValueError(f"consistency_times needs num_steps >= 1; got {num_steps}")
    if not 0 < t_max <= math.pi / 2:
        raise ValueError(f"t_max must be in (0, pi/2]; got {t_max!r}")
    if num_steps > 1 and not 0 < t_mid < t_max:
        raise ValueError(f"t_mid must be in (0, t_max={t_max!r}); got {t_mid!r}")
    rest = [t_mid * (num_steps - 1 - i) / (num_steps - 1) for i in range(num_steps - 1)]
    return (float(t_max), *(float(t) for t in rest))


def _check_times(times: Any) -> tuple[float, ...]:
    try:
        times = tuple(float(t) for t in times)
    except TypeError as e:
        raise ValueError(f"times must be a tuple of Python floats; got {times!r}") from e
    if not times:
        raise ValueError("times must hold at least one time; got ()")
    for t in times:
        if not 0 < t <= math.pi / 2:
            raise ValueError(f"consistency sampling time {t!r} is outside (0, pi/2]")
    for a, b in itertools.pairwise(times):
        if not b < a:
            raise ValueError(f"times must be strictly decreasing; got {b!r} after {a!r}")
    return times


def sample_consistency(
    apply_fn: ApplyFn,
    params: Any,
    key: Array,
    shape: tuple[int, ...],
    times: tuple[float, ...],
    sigma_d: float,
    labels: Array | None = None,
    guidance: Array | float | None = None,
    dtype: Any = jnp.float32,
    unroll: bool = False,
) -> Array:
    """Multistep consistency sampling: one network evaluation per entry of ``times``.

    x ~ N(0, sigma_d^2 I) of ``shape`` is taken as x_{times[0]}; at each t_i,
    x0 = f(x, t_i) = cos t_i x - sin t_i sigma_d F(x / sigma_d, t_i) (``trigflow.consistency_fn``),
    and, if a time t_{i+1} follows, x = cos t_{i+1} x0 + sin t_{i+1} z' with fresh noise
    z' ~ N(0, sigma_d^2 I). Returns the last x0. Jit with ``static_argnames=CONSISTENCY_STATIC``
    or use :func:`make_consistency_sampler`.

    Args:
      apply_fn, params: the consistency model F (``ApplyFn`` convention), called with ``key=None``.
      key: PRNG key, split as ``k_init, k_steps = jax.random.split(key)``: x_{times[0]} =
        ``trigflow.sample_noise(k_init, shape, sigma_d, dtype)``; step i draws its fresh noise
        from ``jax.random.split(k_steps, len(times))[i]``.
      shape: ``(B, ...)`` output shape (static).
      times: strictly decreasing Python floats in (0, pi/2] (static), e.g.
        :func:`consistency_times`.
      sigma_d: data std.
      labels: int ``(B,)`` (or one-hot) class labels passed to ``apply_fn``, or None.
      guidance: the student's CFG-scale input, scalar or ``(B,)`` (broadcast), or None.
      dtype: float dtype of the noise and of the samples.
      unroll: unroll the steps into straight-line code (one network copy per step in the
        program, so compilation takes longer) instead of a loop: XLA can then compute
        loop-invariant work such as the weight normalisation once and needs no loop control
        between steps (``benchmarks/sampling.py`` measures both). Same samples either way.
    Returns:
      x0 of ``shape`` and ``dtype``.
    Raises:
      ValueError: a time outside (0, pi/2] or times not strictly decreasing (names the value).
    """
    times = _check_times(times)
    b = shape[0]
    k_init, k_steps = jax.random.split(key)
    x = trigflow.sample_noise(k_init, shape, sigma_d, dtype)
    g = None if guidance is None else _batch(guidance, b, dtype)
    t_now = jnp.asarray(times, dtype)
    t_next = jnp.asarray((*times[1:], 0.0), dtype)  # renoising to t = 0 leaves x0 unchanged

    def step(x, inputs):
        t, t_n, k = inputs
        tb = _batch(t, b, dtype)
        x0 = trigflow.consistency_fn(x, tb, apply_fn(params, x / sigma_d, tb, labels, g), sigma_d)
        z = trigflow.sample_noise(k, shape, sigma_d, dtype)
        return trigflow.add_noise(x0, z, t_n), None

    keys = jax.random.split(k_steps, len(times))
    x, _ = jax.lax.scan(step, x, (t_now, t_next, keys), unroll=len(times) if unroll else 1)
    return x


def make_consistency_sampler(
    apply_fn: ApplyFn,
    shape: tuple[int, ...],
    times: tuple[float, ...],
    sigma_d: float,
    dtype: Any = jnp.float32,
    unroll: bool = False,
) -> Callable[..., Array]:
    """Jitted ``sample(params, key, labels=None, guidance=None) -> x0``.

    Wraps :func:`sample_consistency` (``unroll`` as there); ``times`` are validated now (the
    same ValueErrors).
    """
    times = _check_times(times)
    shape = tuple(int(s) for s in shape)

    def sample(params, key, labels=None, guidance=None):
        return sample_consistency(
            apply_fn, params, key, shape, times, sigma_d, labels, guidance, dtype, unroll
        )

    return jax.jit(sample)
