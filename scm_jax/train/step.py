"""One training step for every objective: diffusion (teacher), sCT and sCD.

:func:`make_train_step` binds the network, optimiser, objective and their options, and returns
``step(state, x0, labels, teacher_params) -> (state, values)``: draws noise, times, dropout and
guidance scales from ``fold_in(state.key(), state.step)``, computes the loss and its gradient,
applies the optimiser, the forced weight-normalisation projection and the EMAs. A step whose loss
or gradient is not finite changes nothing but the step counter (and is counted in ``values``),
so one bad batch cannot poison the parameters. ``values`` are per-step scalars (and the
per-time-bin losses) for ``scm_jax.train.metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from scm_jax import ema as ema_lib
from scm_jax import trigflow
from scm_jax.guidance import ApplyFn, sample_guidance_scale
from scm_jax.losses import diffusion_loss, scd_loss, sct_loss
from scm_jax.networks import NetworkDef, project_weights
from scm_jax.train.state import TrainState

Array = jax.Array
StepFn = Callable[[TrainState, Array, Array | None, Any], tuple[TrainState, dict[str, Array]]]


def _tree_where(ok: Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def make_train_step(
    nd: NetworkDef,
    tx: optax.GradientTransformation,
    schedule: Callable[[Array], Array],
    *,
    objective: str,
    sigma_d: float,
    P_mean: float,
    P_std: float,
    batch_size: int,
    power_std: Sequence[float],
    halflife_kimg: float,
    loss_options: Mapping[str, Any] | None = None,
    adaptive_weighting: bool = True,
    teacher_apply_fn: ApplyFn | None = None,
    guidance_range: tuple[float, float] = (1.0, 1.0),
    time_edges: tuple[float, ...] | None = None,
) -> StepFn:
    """The (unjitted) training step of ``objective``.

    Args:
      nd: the student (or teacher being trained) network; tx, schedule: optimiser and its
        step -> learning-rate function (``scm_jax.optim.make_optimizer``).
      objective: ``'diffusion'``, ``'sct'`` or ``'scd'``.
      sigma_d, P_mean, P_std: TrigFlow data std and the log-normal time proposal.
      batch_size: global batch (images per step, for the EMAs).
      power_std, halflife_kimg: EMA profiles (``config.ema``).
      loss_options: consistency-loss options (``warmup_steps``, ``warmup_form``,
        ``tangent_norm``, ``tangent_c``, ``mask_nonfinite``).
      adaptive_weighting: learn w_phi(t) (False: the fixed prior weight).
      teacher_apply_fn: sCD's teacher (``ApplyFn``), evaluated with the ``teacher_params``
        argument of the returned step.
      guidance_range: sCD's per-sample CFG scale s ~ U[min, max] (students with a guidance input).
      time_edges: inner time-bin edges of the per-bin loss (default: batch quartiles).
    Returns:
      ``step(state, x0 (B, ...) float32, labels (B,) int32 | None, teacher_params)`` returning
      ``(new_state, values)`` with ``values``: loss, mse, w_mean, loss_per_time_bin (K,),
      grad_norm, learning_rate, nonfinite_steps (0/1), and for consistency objectives
      tangent_norm, tangent_norm_max, nonfinite (fraction of samples), warmup_r.
    Raises:
      ValueError: an unknown objective, sCD without a teacher, or a guidance range the student
        cannot take.
    """
    if objective not in ("diffusion", "sct", "scd"):
        raise ValueError(f"unknown objective {objective!r}; expected diffusion, sct or scd")
    if objective == "scd" and teacher_apply_fn is None:
        raise ValueError("sCD needs a teacher (teacher_apply_fn)")
    g_min, g_max = (float(v) for v in guidance_range)
    guided = objective == "scd" and nd.guidance_input
    if objective == "scd" and not nd.guidance_input and (g_min, g_max) != (1.0, 1.0):
        raise ValueError(
            f"teacher guidance range [{g_min}, {g_max}] needs a student with a guidance input "
            "(model.guidance_input=True); or set teacher.guidance_min = guidance_max = 1"
        )
    if guided and nd.num_classes == 0:
        raise ValueError("classifier-free guidance needs a class-conditional network")
    cm_options = dict(loss_options or {})
    weight_fn = nd.weight_fn if adaptive_weighting else None

    def loss_fn(params, x0, labels, teacher_params, key, step):
        b = x0.shape[0]
        k_z, k_t, k_drop, k_s = jax.random.split(key, 4)
        z = trigflow.sample_noise(k_z, x0.shape, sigma_d, x0.dtype)
        t = trigflow.sample_t_lognormal(k_t, (b,), P_mean, P_std, sigma_d, x0.dtype)
        common = {"sigma_d": sigma_d, "labels": labels, "key": k_drop, "time_edges": time_edges}
        if objective == "diffusion":
            return diffusion_loss(nd.apply_fn, weight_fn, params, x0, z, t, **common)
        cm = {**common, "step": step, **cm_options}
        if objective == "sct":
            return sct_loss(nd.apply_fn, weight_fn, params, x0, z, t, **cm)
        guidance = sample_guidance_scale(k_s, b, g_min, g_max, x0.dtype) if guided else None
        return scd_loss(
            nd.apply_fn, weight_fn, params, teacher_apply_fn, teacher_params, x0, z, t,
            guidance=guidance, **cm,
        )  # fmt: skip

    def train_step(state, x0, labels, teacher_params):
        key = jax.random.fold_in(state.key(), state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, x0, labels, teacher_params, key, state.step
        )
        grad_norm = optax.tree_utils.tree_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = project_weights(optax.apply_updates(state.params, updates))
        params = _tree_where(ok, params, state.params)
        opt_state = _tree_where(ok, opt_state, state.opt_state)
        nimg = (state.step + 1).astype(jnp.float32) * batch_size
        emas = ema_lib.update_emas(
            state.emas, params["net"], nimg, batch_size, power_std, halflife_kimg
        )
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            emas=_tree_where(ok, emas, state.emas),
        )  # fmt: skip
        values = {
            "loss": loss,
            "mse": aux["mse"],
            "w_mean": aux["w_mean"],
            "loss_per_time_bin": aux["loss_per_time_bin"],
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "nonfinite_steps": 1.0 - ok.astype(jnp.float32),
        }
        if objective != "diffusion":
            values.update(
                tangent_norm=aux["g_norm_mean"],
                tangent_norm_std=aux["g_norm_std"],
                tangent_norm_max=aux["g_norm_max"],
                nonfinite=aux["nonfinite_fraction"],
                warmup_r=aux["r"],
            )
        return new_state, values

    return train_step
