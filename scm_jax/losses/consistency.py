"""Continuous-time consistency objectives: sCT and sCD (sCM §4.2, Alg. 1; reference §2.3-2.5).

One ``jax.jvp`` of the stop-gradient network F_theta- at (x_t / sigma_d, t) with tangents
(cos t sin t dx_t/dt, cos t sin t sigma_d) gives F- and J = sigma_d cos t sin t dF-/dt (the
paper's rearrangement, which keeps tangent activations small near t = 0 and t = pi/2). Then

  g = -cos^2 t (sigma_d F- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF-/dt)          (Alg. 1)
  g <- g / (||g|| + c)                                                   (tangent normalisation)
  L = (e^{w_phi(t)} / D) ||F_theta - F_theta- - g||^2 - w_phi(t)                         (Eq. 8)

with r = min(1, step / H) (tangent warm-up) and theta- = stop_gradient(theta) -- the current
parameters, not an EMA. At theta = theta- the gradient is -(2 e^{w} / D) (dF/dtheta)^T g: F is
pushed along g. dx_t/dt is cos t z - sin t x0 for sCT and sigma_d F_teacher(x_t / sigma_d, t) for
sCD (classifier-free guided at a per-sample scale s that the student receives as an input).

Dropout: the JVP pass and the gradient pass get the same dropout key, so both see the same
dropout and label-dropout masks; F- is then exactly the stop-gradient of the function being
trained. The loss uses F - stop_gradient(F) from the gradient pass (zero in value) and F- from
the JVP pass inside g.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import trigflow
from scm_jax.guidance import ApplyFn, guided_F
from scm_jax.losses.common import (
    TANGENT_NORMS,
    WARMUP_FORMS,
    check_batch,
    expand,
    normalize_tangent,
    per_sample_sum,
    tangent_warmup,
    time_bin_means,
    weighted_loss,
)

Array = jax.Array
WeightFn = Callable[[Any, Array], Array]


def tangent_jvp(
    apply_fn: ApplyFn,
    params_net: Any,
    x_t: Array,
    t: Array,
    dx_dt: Array,
    *,
    sigma_d: float,
    labels: Array | None = None,
    guidance: Array | None = None,
    key: Array | None = None,
) -> tuple[Array, Array]:
    """F- and J = sigma_d cos t sin t dF-/dt from one JVP with the paper's rearrangement (§5.1).

    Primals (x_t / sigma_d, t), tangents (cos t sin t dx_t/dt, cos t sin t sigma_d); the network's
    parameters are stop-gradient (theta-) and closed over, so only activations carry tangents.

    Returns:
      ``(F_minus, J)``, each of the shape of ``x_t``.
    """
    p = jax.lax.stop_gradient(params_net)
    cs = jnp.cos(t) * jnp.sin(t)

    def F_minus(x_scaled: Array, tt: Array) -> Array:
        return apply_fn(p, x_scaled, tt, labels, guidance, key)

    tangents = (expand(cs, x_t) * dx_dt, cs * sigma_d)
    return jax.jvp(F_minus, (x_t / sigma_d, t), tangents)


def consistency_target(
    apply_fn: ApplyFn,
    params_net: Any,
    x_t: Array,
    t: Array,
    dx_dt: Array,
    *,
    sigma_d: float,
    r: Array | float = 1.0,
    labels: Array | None = None,
    guidance: Array | None = None,
    key: Array | None = None,
    warmup_form: str = "scm",
) -> tuple[Array, Array]:
    """The raw (unnormalised) target g and F- from one JVP of the stop-gradient network.

    With r = 1, g = cos t * df-/dt: the time derivative of the consistency function along the
    PF-ODE with velocity ``dx_dt``, weighted by cos t (the prior weight 1 / (sigma_d tan t)).

    Args:
      apply_fn, params_net: the student network (``ApplyFn``) and its parameters.
      x_t: ``(B, ...)`` noisy samples; t: ``(B,)`` times; dx_dt: ``(B, ...)`` PF-ODE velocity.
      sigma_d: data std.
      r: tangent warm-up coefficient in [0, 1].
      labels, guidance, key: passed to the network (the same key as the gradient pass).
      warmup_form: ``'scm'`` (Alg. 1: r scales the whole second term) or ``'rcm'`` (rCM:
        g = -cos t sqrt(1 - r^2 sin^2 t)(sigma_d F- - dx/dt) - (r cos t sin t x_t + J)).
    Returns:
      ``(g, F_minus)``, both stop-gradient, shape of ``x_t``.
    """
    if warmup_form not in WARMUP_FORMS:
        raise ValueError(f"unknown warmup_form {warmup_form!r}; expected one of {WARMUP_FORMS}")
    F_m, J = tangent_jvp(
        apply_fn, params_net, x_t, t, dx_dt, sigma_d=sigma_d, labels=labels, guidance=guidance,
        key=key,
    )  # fmt: skip
    c, s = expand(jnp.cos(t), x_t), expand(jnp.sin(t), x_t)
    residual = sigma_d * F_m - dx_dt
    if warmup_form == "scm":
        g = -(c**2) * residual - r * (c * s * x_t + J)
    else:
        g = -c * jnp.sqrt(1 - (r * s) ** 2) * residual - (r * c * s * x_t + J)
    return jax.lax.stop_gradient(g), jax.lax.stop_gradient(F_m)


def consistency_loss(
    apply_fn: ApplyFn,
    weight_fn: WeightFn | None,
    params: dict[str, Any],
    x_t: Array,
    t: Array,
    dx_dt: Array,
    *,
    sigma_d: float,
    step: Array | int,
    labels: Array | None = None,
    guidance: Array | None = None,
    key: Array | None = None,
    warmup_steps: int = 10_000,
    warmup_form: str = "scm",
    tangent_norm: str = "l2",
    tangent_c: float = 0.1,
    mask_nonfinite: bool = True,
    time_edges: tuple[float, ...] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """sCM loss (Eq. 8) given x_t and the PF-ODE velocity dx_dt; shared by sCT and sCD.

    Args:
      apply_fn: student network (``ApplyFn``); weight_fn: w_phi or None (fixed prior weight).
      params: ``{'net': ..., 'weight': ...}``.
      x_t, t, dx_dt: ``(B, ...)``, ``(B,)``, ``(B, ...)``.
      sigma_d: data std; step: optimiser step (for the warm-up).
      labels, guidance, key: network inputs and the dropout key shared by both passes.
      warmup_steps: H (0: no warm-up); warmup_form: ``'scm'`` or ``'rcm'``.
      tangent_norm: one of ``TANGENT_NORMS`` (default ``'l2'``, docs/method.md); tangent_c: c.
      mask_nonfinite: drop samples whose target is not finite (counted in the diagnostics).
      time_edges: inner time-bin edges of the per-bin loss diagnostic.
    Returns:
      ``(loss, aux)`` with aux: ``loss_per_time_bin``, ``g_norm_mean``, ``g_norm_std``,
      ``g_norm_max`` (raw target norms of finite samples), ``nonfinite_fraction``, ``r``,
      ``w_mean``, ``mse`` (mean ||F - F- - g||^2 / D).
    """
    if tangent_norm not in TANGENT_NORMS:
        raise ValueError(f"unknown tangent_norm {tangent_norm!r}; expected one of {TANGENT_NORMS}")
    D = math.prod(x_t.shape[1:])
    r = tangent_warmup(step, warmup_steps)
    g, _ = consistency_target(
        apply_fn, params["net"], x_t, t, dx_dt, sigma_d=sigma_d, r=r, labels=labels,
        guidance=guidance, key=key, warmup_form=warmup_form,
    )  # fmt: skip
    g_norm = jnp.sqrt(per_sample_sum(g**2))
    finite = jnp.isfinite(g_norm)
    if mask_nonfinite:
        g = jnp.where(expand(finite, g), g, 0.0)
    g = normalize_tangent(g, tangent_norm, tangent_c)

    F = apply_fn(params["net"], x_t / sigma_d, t, labels, guidance, key)
    sq_err = per_sample_sum((F - jax.lax.stop_gradient(F) - g) ** 2)
    w = None if weight_fn is None else weight_fn(params["weight"], t)
    per_sample = weighted_loss(sq_err, w, D)
    keep = finite.astype(jnp.float32) if mask_nonfinite else jnp.ones_like(g_norm)
    per_sample = jnp.where(keep > 0, per_sample, 0.0)
    n_keep = jnp.maximum(keep.sum(), 1.0)
    g_fin = jnp.where(finite, g_norm, 0.0)
    g_mean = g_fin.sum() / jnp.maximum(finite.sum(), 1)
    aux = {
        "loss_per_time_bin": time_bin_means(per_sample, t, time_edges),
        "g_norm_mean": g_mean,
        "g_norm_std": jnp.sqrt(
            jnp.where(finite, (g_norm - g_mean) ** 2, 0.0).sum() / jnp.maximum(finite.sum(), 1)
        ),
        "g_norm_max": jnp.max(g_fin),
        "nonfinite_fraction": 1.0 - finite.mean(),
        "r": r,
        "w_mean": jnp.float32(0.0) if w is None else jnp.mean(w),
        "mse": jnp.where(keep > 0, sq_err, 0.0).sum() / n_keep / D,
    }
    return per_sample.sum() / n_keep, aux


def sct_loss(
    apply_fn: ApplyFn,
    weight_fn: WeightFn | None,
    params: dict[str, Any],
    x0: Array,
    z: Array,
    t: Array,
    *,
    sigma_d: float,
    step: Array | int,
    labels: Array | None = None,
    key: Array | None = None,
    **kwargs: Any,
) -> tuple[Array, dict[str, Array]]:
    """Consistency training: dx_t/dt = cos t z - sin t x0 from the same (x0, z) that built x_t.

    Args as :func:`consistency_loss`, with data ``x0`` and noise ``z`` (std sigma_d) instead of
    (x_t, dx_dt); ``kwargs`` are its keyword options.
    """
    check_batch(x0, t, z, labels)
    x_t = trigflow.add_noise(x0, z, t)
    dx_dt = trigflow.velocity_target(x0, z, t)
    return consistency_loss(
        apply_fn, weight_fn, params, x_t, t, dx_dt, sigma_d=sigma_d, step=step, labels=labels,
        key=key, **kwargs,
    )  # fmt: skip


def teacher_velocity(
    teacher_apply_fn: ApplyFn,
    teacher_params: Any,
    x_t: Array,
    t: Array,
    *,
    sigma_d: float,
    labels: Array | None = None,
    guidance: Array | None = None,
) -> Array:
    """sCD's PF-ODE velocity sigma_d F_teacher(x_t / sigma_d, t), CFG-guided at ``guidance``.

    The teacher runs in evaluation mode (its EMA weights, no dropout). ``guidance`` ``(B,)`` scales
    need labels; None evaluates the teacher once on the given labels.
    """
    x_scaled = x_t / sigma_d
    if guidance is None:
        F_T = teacher_apply_fn(teacher_params, x_scaled, t, labels, None, None)
    else:
        if labels is None:
            raise ValueError("classifier-free guidance of the teacher needs class labels")
        F_T = guided_F(teacher_apply_fn, teacher_params, x_scaled, t, labels, guidance)
    return jax.lax.stop_gradient(sigma_d * F_T)


def scd_loss(
    apply_fn: ApplyFn,
    weight_fn: WeightFn | None,
    params: dict[str, Any],
    teacher_apply_fn: ApplyFn,
    teacher_params: Any,
    x0: Array,
    z: Array,
    t: Array,
    *,
    sigma_d: float,
    step: Array | int,
    labels: Array | None = None,
    guidance: Array | None = None,
    key: Array | None = None,
    **kwargs: Any,
) -> tuple[Array, dict[str, Array]]:
    """Consistency distillation: dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t) (guided).

    Args as :func:`sct_loss`, plus the teacher (``ApplyFn`` and parameters) and ``guidance``:
    ``(B,)`` per-sample CFG scales s (drawn by the caller, e.g. U[1, 2] on ImageNet-512) that
    guide the teacher and are the student's guidance input; None for an unguided teacher.
    """
    check_batch(x0, t, z, labels)
    x_t = trigflow.add_noise(x0, z, t)
    dx_dt = teacher_velocity(
        teacher_apply_fn, teacher_params, x_t, t, sigma_d=sigma_d, labels=labels, guidance=guidance
    )
    return consistency_loss(
        apply_fn, weight_fn, params, x_t, t, dx_dt, sigma_d=sigma_d, step=step, labels=labels,
        guidance=guidance, key=key, **kwargs,
    )  # fmt: skip
