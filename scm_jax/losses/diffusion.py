"""The TrigFlow diffusion (teacher) objective with learned adaptive weighting (sCM §2, App. D).

L = E_{x0, z, t} [ (e^{w_phi(t)} / D) ||sigma_d F_theta(x_t / sigma_d, t) - v_t||^2 - w_phi(t) ],
v_t = cos t z - sin t x0, t from the log-normal proposal (drawn by the caller). Label dropout for
classifier-free guidance is the network's own (``label_dropout``, active when a dropout key is
given).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import trigflow
from scm_jax.guidance import ApplyFn
from scm_jax.losses.common import check_batch, per_sample_sum, time_bin_means, weighted_loss

Array = jax.Array


def diffusion_loss(
    apply_fn: ApplyFn,
    weight_fn: Callable[[Any, Array], Array] | None,
    params: dict[str, Any],
    x0: Array,
    z: Array,
    t: Array,
    *,
    sigma_d: float,
    labels: Array | None = None,
    guidance: Array | None = None,
    key: Array | None = None,
    time_edges: tuple[float, ...] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Teacher loss for one batch.

    Args:
      apply_fn: the network in the ``ApplyFn`` convention (``scm_jax.guidance``).
      weight_fn: w_phi(params['weight'], t) -> ``(B,)``, or None for the fixed prior weight.
      params: ``{'net': ..., 'weight': ...}`` (``'weight'`` unused when ``weight_fn`` is None).
      x0: data ``(B, ...)`` with per-element std sigma_d; z: noise of the same shape (std sigma_d).
      t: ``(B,)`` times in (0, pi/2].
      sigma_d: data standard deviation.
      labels: int ``(B,)`` class labels (-1 = null) or None.
      guidance: ``(B,)`` guidance input of a network that takes one (DMD's critic of a student
        with a guidance input), or None.
      key: dropout key (dropout and label dropout on), or None.
      time_edges: inner edges of the time bins of the per-bin diagnostic.
    Returns:
      ``(loss, aux)``: the scalar mean loss and diagnostics ``loss_per_time_bin``,
      ``mse`` (mean ||sigma_d F - v||^2 / D), ``w_mean``.
    """
    check_batch(x0, t, z, labels)
    D = math.prod(x0.shape[1:])
    x_t = trigflow.add_noise(x0, z, t)
    v_t = trigflow.velocity_target(x0, z, t)
    F = apply_fn(params["net"], x_t / sigma_d, t, labels, guidance, key)
    sq_err = per_sample_sum((sigma_d * F - v_t) ** 2)
    w = None if weight_fn is None else weight_fn(params["weight"], t)
    per_sample = weighted_loss(sq_err, w, D)
    aux = {
        "loss_per_time_bin": time_bin_means(per_sample, t, time_edges),
        "mse": jnp.mean(sq_err) / D,
        "w_mean": jnp.float32(0.0) if w is None else jnp.mean(w),
    }
    return jnp.mean(per_sample), aux
