"""Student rollouts for DMD and rCM: the samples the generator loss and the critic see
(reference §7 DMD2 backward simulation, §8 rCM rollouts).

A rollout is the multistep consistency sampler (``scm_jax.sampling.sample_consistency``) run on
the student during training: x = z ~ N(0, sigma_d^2 I) at t_1; for each step x0 = f_theta(x, t_n),
then x = cos t_{n+1} x0 + sin t_{n+1} z' with fresh noise. Only the last of the n steps carries
the gradient (rCM: "backprop only through the last step"); the earlier ones use stop-gradient
parameters, so their cost is a forward each and no activation memory.

Times, ``(N, B)`` per sample:

* fixed (DMD2's multi-step generator): the sampler's own times ``consistency_times(N, t_max)``
  for every sample, so training sees exactly the inputs of N-step sampling;
* random (rCM): t_1 = t_max, t_hat_n ~ p_D (log-normal), t_n = min(t_hat_n, t_{n-1}).

The number of steps n ~ U{1, ..., N} is drawn once per batch (as rCM does); the earlier n - 1
steps are a loop with a dynamic trip count (a ``while`` loop under ``jax.jit``), so a batch costs
n forwards, N / 2 + 1/2 on average.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import trigflow
from scm_jax.guidance import ApplyFn

Array = jax.Array

__all__ = ["fixed_rollout_times", "random_rollout_times", "sample_num_steps", "student_rollout"]


def fixed_rollout_times(times: tuple[float, ...], batch: int, dtype: Any = jnp.float32) -> Array:
    """``(N, B)`` times: the given strictly decreasing ``times`` (e.g. ``consistency_times``) for
    every sample."""
    t = jnp.asarray(times, dtype)
    return jnp.broadcast_to(t[:, None], (t.shape[0], batch))


def random_rollout_times(
    key: Array,
    batch: int,
    num_steps: int,
    t_max: float,
    P_mean: float,
    P_std: float,
    sigma_d: float,
    dtype: Any = jnp.float32,
) -> Array:
    """rCM's rollout times ``(N, B)``: t_1 = t_max, t_hat_n ~ p_D, t_n = min(t_hat_n, t_{n-1}).

    p_D is the log-normal proposal (``trigflow.sample_t_lognormal``). Non-increasing in n per
    sample (equal times are allowed: the step then re-noises to the same time).
    """
    if num_steps < 1:
        raise ValueError(f"a rollout needs num_steps >= 1; got {num_steps}")
    t_hat = trigflow.sample_t_lognormal(key, (num_steps, batch), P_mean, P_std, sigma_d, dtype)
    t_hat = t_hat.at[0].set(jnp.asarray(t_max, dtype))
    return jax.lax.cummin(t_hat, axis=0)


def sample_num_steps(key: Array, max_steps: int) -> Array:
    """n ~ U{1, ..., max_steps}: int32 scalar (the rollout length of a batch)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1; got {max_steps}")
    return jax.random.randint(key, (), 1, max_steps + 1, jnp.int32)


def student_rollout(
    apply_fn: ApplyFn,
    params: Any,
    z: Array,
    times: Array,
    n: Array | int,
    key: Array,
    *,
    sigma_d: float,
    labels: Array | None = None,
    guidance: Array | None = None,
    dropout_key: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Run n steps of the student from z and return the last step's x0 with its gradient.

    Args:
      apply_fn, params: the student F_theta (``ApplyFn``) and its network parameters.
      z: ``(B, ...)`` noise of std sigma_d, taken as x at ``times[0]``.
      times: ``(N, B)`` rollout times (:func:`fixed_rollout_times`, :func:`random_rollout_times`).
      n: number of steps in [1, N] (a traced int32 is fine).
      key: PRNG key of the fresh re-noising noise (step i uses ``fold_in(key, i)``).
      sigma_d: data std.
      labels, guidance: the student's inputs.
      dropout_key: dropout key(s) of the last step only (None: evaluation mode); the earlier steps
        always run in evaluation mode.
    Returns:
      ``(x0, x, t)``: x0 = f_theta(x, t) ``(B, ...)`` differentiable in ``params`` through the last
      step only; x (stop-gradient) and t ``(B,)`` the last step's input.
    """
    frozen = jax.lax.stop_gradient(params)

    def f(p: Any, x: Array, t: Array, drop: Array | None) -> Array:
        return trigflow.consistency_fn(
            x, t, apply_fn(p, x / sigma_d, t, labels, guidance, drop), sigma_d
        )

    def body(i: Array, x: Array) -> Array:
        x0 = f(frozen, x, times[i], None)
        eps = trigflow.sample_noise(jax.random.fold_in(key, i), x.shape, sigma_d, x.dtype)
        return trigflow.add_noise(x0, eps, times[i + 1])

    n = jnp.asarray(n, jnp.int32)
    x = jax.lax.stop_gradient(jax.lax.fori_loop(0, n - 1, body, z))
    t = jax.lax.dynamic_index_in_dim(times, n - 1, axis=0, keepdims=False)
    return f(params, x, t, dropout_key), x, t
