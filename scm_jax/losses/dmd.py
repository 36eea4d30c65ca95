"""Distribution matching distillation (DMD, DMD2) in TrigFlow, and rCM's sCD + DMD objective
(reference §7, §8, §2.7). Pure functions of arrays and callables (``ApplyFn``).

Generator. The student is a consistency-function parameterised network used at fixed times:
x0 = f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t / sigma_d, t); one step is
f_theta(z, t_max) with z ~ N(0, sigma_d^2 I) and t_max = arctan(sigma_max / sigma_d) (sCM's
one-step start, §2.7; DMD2 feeds its ImageNet generator sigma = 80 noise), so a student initialised
from the teacher starts as the teacher's one-step denoiser (DMD: G(z) = mu_base(z, T - 1)).
Few-step students are unrolled by ``scm_jax.losses.rollout``.

DMD gradient in rCM's TrigFlow form (§8), for a generator sample x0, t ~ p_D, eps ~ N(0, sigma_d^2):

  x_t = cos t x0 + sin t eps
  f_fake = cos t x_t - sin t sigma_d F_fake(x_t / sigma_d, t),  f_teacher likewise (CFG-guided)
  Delta = (f_fake - f_teacher) / mean|x0 - f_teacher|     (mean over the D elements of a sample)
  L_DMD = ||x0 - sg(x0 - Delta)||^2,      dL_DMD / dx0 = 2 Delta

By Tweedie, the score of the noised law is s = (cos t f - x_t) / (sigma_d^2 sin^2 t), so
Delta = (s_fake - s_teacher) sigma_d^2 sin^2 t / (cos t mean|x0 - f_teacher|): a positive multiple
of the reverse-KL gradient E[(s_fake - s_real) dG/dtheta] of DMD (§7), with DMD's per-sample
normalisation 1 / mean|x0 - f_teacher|. Gradient descent moves x0 towards the teacher's denoised
mean and away from the fake score's. (DMD1 in VP form has an extra alpha_t = cos t factor, which
only reweights t; DMD2's code and rCM have none -- docs/method.md.)

The fake score F_fake (the critic) is trained online with the TrigFlow diffusion loss
(``diffusion_loss``) on stop-gradient generator samples; DMD1's optional regression term is the
squared L2 distance to the teacher's ODE solution from the same noise (DMD used LPIPS).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import trigflow
from scm_jax.guidance import ApplyFn
from scm_jax.losses.common import expand, per_sample_sum, time_bin_means
from scm_jax.losses.consistency import teacher_velocity

Array = jax.Array
REDUCTIONS = ("mean", "sum")

__all__ = [
    "REDUCTIONS",
    "dmd_direction",
    "dmd_generator_loss",
    "dmd_loss",
    "regression_loss",
]


def _reduce(sq_err: Array, D: int, reduction: str) -> Array:
    """Per-sample squared error summed over elements -> ``'sum'`` as is, ``'mean'`` / D."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    return sq_err if reduction == "sum" else sq_err / D


def dmd_direction(
    x0: Array, x_t: Array, t: Array, F_fake: Array, F_teacher: Array, sigma_d: float
) -> tuple[Array, Array]:
    """DMD's normalised update direction Delta = (f_fake - f_teacher) / mean|x0 - f_teacher|.

    Args:
      x0: ``(B, ...)`` generator samples; x_t: their noised versions at ``t`` ``(B,)``.
      F_fake, F_teacher: the fake score's and the (guided) teacher's F at (x_t / sigma_d, t).
      sigma_d: data std.
    Returns:
      ``(Delta, norm)``: Delta of the shape of ``x0`` (0 for a sample whose normaliser is 0 or not
      finite, as DMD2's ``nan_to_num``), and the normaliser mean|x0 - f_teacher| ``(B,)``.
    """
    f_fake = trigflow.denoiser(x_t, t, F_fake, sigma_d)
    f_teacher = trigflow.denoiser(x_t, t, F_teacher, sigma_d)
    D = math.prod(x0.shape[1:])
    norm = per_sample_sum(jnp.abs(x0 - f_teacher)) / D
    ok = jnp.isfinite(norm) & (norm > 0)
    delta = (f_fake - f_teacher) / expand(jnp.where(ok, norm, 1.0), x0).astype(x0.dtype)
    delta = jnp.where(expand(ok, x0) & jnp.isfinite(delta), delta, 0.0)
    return jax.lax.stop_gradient(delta), jax.lax.stop_gradient(norm)


def dmd_loss(x0: Array, delta: Array, reduction: str = "mean") -> Array:
    """Per-sample ||x0 - sg(x0 - Delta)||^2 (``'sum'``) or that / D (``'mean'``): ``(B,)``.

    Its value is ||Delta||^2 (/ D) and its gradient with respect to x0 is 2 Delta (/ D).
    """
    target = jax.lax.stop_gradient(x0 - delta)
    return _reduce(per_sample_sum((x0 - target) ** 2), math.prod(x0.shape[1:]), reduction)


def regression_loss(x0: Array, y: Array, reduction: str = "mean") -> Array:
    """DMD's regression term per sample: ||x0 - sg(y)||^2 (``'sum'``) or that / D: ``(B,)``.

    ``x0``: the generator's one-step output from noise z; ``y``: the teacher's deterministic ODE
    solution from the same z (DMD's paired set; DMD measured it with LPIPS, we use L2).
    """
    sq = per_sample_sum((x0 - jax.lax.stop_gradient(y)) ** 2)
    return _reduce(sq, math.prod(x0.shape[1:]), reduction)


def dmd_generator_loss(
    fake_apply_fn: ApplyFn,
    fake_params: Any,
    teacher_apply_fn: ApplyFn,
    teacher_params: Any,
    x0: Array,
    eps: Array,
    t: Array,
    *,
    sigma_d: float,
    labels: Array | None = None,
    guidance: Array | None = None,
    teacher_guidance: Array | None = None,
    reduction: str = "mean",
    time_edges: tuple[float, ...] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The DMD generator loss of a batch of generator samples (module docstring).

    Args:
      fake_apply_fn, fake_params: the critic F_fake (``ApplyFn``) and its network parameters;
        evaluated in evaluation mode and stop-gradient.
      teacher_apply_fn, teacher_params: the teacher (evaluation mode, stop-gradient).
      x0: ``(B, ...)`` generator samples, carrying the generator's gradient.
      eps: ``(B, ...)`` noise of std sigma_d; t: ``(B,)`` times drawn from p_D.
      sigma_d: data std.
      labels: class labels of the samples (both networks), or None.
      guidance: the student's guidance input (the critic receives it too), or None.
      teacher_guidance: ``(B,)`` CFG scales of the teacher (``guided_F``; needs labels), or None
        for the teacher on ``labels`` unguided.
      reduction: ``'mean'`` (/ D) or ``'sum'`` over the elements of a sample.
      time_edges: inner time-bin edges of the per-bin diagnostic.
    Returns:
      ``(loss, aux)``: the batch mean of :func:`dmd_loss`; aux ``loss_per_time_bin``,
      ``delta_rms`` (root mean square of Delta), ``norm_mean`` (mean normaliser
      mean|x0 - f_teacher|), ``nonfinite_fraction`` (samples whose Delta was zeroed).
    """
    x_t = jax.lax.stop_gradient(trigflow.add_noise(x0, eps, t))
    x_scaled = x_t / sigma_d
    F_fake = fake_apply_fn(jax.lax.stop_gradient(fake_params), x_scaled, t, labels, guidance, None)
    F_teacher = teacher_velocity(
        teacher_apply_fn, jax.lax.stop_gradient(teacher_params), x_t, t, sigma_d=sigma_d,
        labels=labels, guidance=teacher_guidance,
    ) / sigma_d  # fmt: skip
    delta, norm = dmd_direction(jax.lax.stop_gradient(x0), x_t, t, F_fake, F_teacher, sigma_d)
    per_sample = dmd_loss(x0, delta, reduction)
    ok = jnp.isfinite(norm) & (norm > 0)
    D = math.prod(x0.shape[1:])
    aux = {
        "loss_per_time_bin": time_bin_means(jax.lax.stop_gradient(per_sample), t, time_edges),
        "delta_rms": jnp.sqrt(jnp.mean(per_sample_sum(delta**2)) / D),
        "norm_mean": jnp.mean(jnp.where(ok, norm, 0.0)),
        "nonfinite_fraction": 1.0 - ok.mean(),
    }
    return jnp.mean(per_sample), aux
