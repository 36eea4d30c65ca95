"""One training step for every objective: diffusion (teacher), sCT and sCD.

:func:`make_train_step` binds the network, optimiser, objective and their options, and returns
``step(state, x0, labels, teacher_params) -> (state, values)``: draws noise, times, dropout and
guidance scales from ``fold_in(state.key(), state.step)``, computes the loss and its gradient,
applies the optimiser, the forced weight-normalisation projection and the EMAs. A step whose loss
or gradient is not finite changes nothing but the step counter (and is counted in ``values``),
so one bad batch cannot poison the parameters. ``values`` are per-step scalars (and the
per-time-bin losses) for ``scm_jax.train.metrics``.

Gradient accumulation (``micro_batches`` k > 1): the randomness is drawn for the whole batch
first, then the batch and its randomness are cut into k micro-batches that a ``jax.lax.scan``
runs one after the other (activation memory of one micro-batch), summing gradients and metric
statistics weighted by their sample counts; one optimiser update follows. The step equals the
k = 1 step up to float32 summation order (tests/memory_test.py), because every per-sample random
number is a function of the step key and the sample's row only:

* z, t and sCD's guidance scale are drawn at the whole batch's shape and sliced;
* dropout and label dropout (networks with a non-zero rate) use a key per sample,
  ``fold_in(k_drop, row)``: the network is ``vmap``-ed over samples (``_per_sample_dropout``),
  so a sample's masks never depend on which other samples share its (micro-)batch.

Micro-batch layout: the global batch arrives split contiguously over the S batch shards
(``batch_sharding``: data x fsdp devices; shard s holds rows [s B/S, (s+1) B/S)). Micro-batch j
takes rows [j B/(S k), (j+1) B/(S k)) *of every shard* (reshape ``(S, k, B/(S k), ...)``, swap the
first two axes, reshape ``(k, B/k, ...)``): the scanned axis is unsharded and each device only
ever reads its own rows, so the split moves no data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from scm_jax import ema as ema_lib
from scm_jax import objectives, trigflow
from scm_jax.guidance import ApplyFn, sample_guidance_scale
from scm_jax.networks import NetworkDef, project_weights
from scm_jax.run.state import TrainState
from scm_jax.train.microbatch import accumulate_micro_batches

Array = jax.Array
StepFn = Callable[[TrainState, Array, Array | None, Any], tuple[TrainState, dict[str, Array]]]


def _tree_where(ok: Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _batch_layout(sharding: NamedSharding | None) -> tuple[tuple[str, ...] | None, int]:
    """The mesh axes that split the batch (leading) dimension of ``sharding`` and their product."""
    if sharding is None or not len(sharding.spec) or sharding.spec[0] is None:
        return None, 1
    axes = sharding.spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return axes, math.prod(sharding.mesh.shape[a] for a in axes)


def _has_dropout(nd: NetworkDef) -> bool:
    """Whether the network draws random numbers in training (dropout or label dropout)."""
    return any(float(getattr(nd.net, a, 0.0)) > 0 for a in ("dropout", "label_dropout"))


def _per_sample_dropout(apply_fn: ApplyFn, spmd_axes: tuple[str, ...] | None) -> ApplyFn:
    """``apply_fn`` that takes a ``(B,)`` array of dropout keys, one per sample.

    The network runs ``vmap``-ed over the batch (a batch of one inside), so sample i's dropout
    and label-dropout masks come from ``key[i]`` alone. ``spmd_axes``: the mesh axes the batch is
    split over, so that sharding constraints inside the network keep the batch split. A scalar
    key (or None) calls ``apply_fn`` unchanged.
    """

    def apply(params, x_scaled, t, labels=None, guidance=None, key=None):
        if key is None or key.ndim == 0:
            return apply_fn(params, x_scaled, t, labels, guidance, key)

        def one(x, tt, y, g, k):
            y, g = (None if a is None else a[None] for a in (y, g))
            return apply_fn(params, x[None], tt[None], y, g, k)[0]

        return jax.vmap(one, spmd_axis_name=spmd_axes)(x_scaled, t, labels, guidance, key)

    return apply


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
    micro_batches: int = 1,
    batch_sharding: NamedSharding | None = None,
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
      micro_batches: k; the batch is processed as k micro-batches of ``batch_size / k`` with
        accumulated gradients (module docstring). The result equals k = 1 up to float rounding.
      batch_sharding: the sharding of ``x0`` (``scm_jax.sharding.batch_sharding``), so that
        micro-batches and the per-sample dropout ``vmap`` keep each device's rows local; None:
        an unsharded batch.
    Returns:
      ``step(state, x0 (B, ...) float32, labels (B,) int32 | None, teacher_params)`` returning
      ``(new_state, values)`` with ``values``: loss, mse, w_mean, loss_per_time_bin (K,),
      grad_norm, learning_rate, nonfinite_steps (0/1), and for consistency objectives
      tangent_norm, tangent_norm_max, nonfinite (fraction of samples), warmup_r.
    Raises:
      ValueError: an unknown objective, sCD without a teacher, a guidance range the student
        cannot take, or a batch that does not split into ``micro_batches`` x batch shards.
    """
    entry = objectives.get(objective)
    g_min, g_max = (float(v) for v in guidance_range)
    guided = _check_step_options(entry, nd, teacher_apply_fn, (g_min, g_max), micro_batches)
    k = int(micro_batches)
    batch_axes, shards = _batch_layout(batch_sharding)
    check_micro_batches(batch_size, k, shards)
    cm = entry.consistency
    cm_options = dict(loss_options or {})
    mask_nonfinite = bool(cm_options.get("mask_nonfinite", True))
    weight_fn = nd.weight_fn if adaptive_weighting else None
    stochastic = _has_dropout(nd)
    apply_fn = _per_sample_dropout(nd.apply_fn, batch_axes) if stochastic else nd.apply_fn

    loss_fn = objective_loss_fn(entry, apply_fn, weight_fn, teacher_apply_fn, sigma_d=sigma_d,
                                cm_options=cm_options, stochastic=stochastic)  # fmt: skip

    def train_step(state, x0, labels, teacher_params):
        check_micro_batches(x0.shape[0], k, shards)
        key = jax.random.fold_in(state.key(), state.step)
        rand, k_drop = draw_randomness(
            key,
            x0,
            sigma_d=sigma_d,
            P_mean=P_mean,
            P_std=P_std,
            guidance_range=(g_min, g_max) if guided else None,
        )
        batch = {"x0": x0, "labels": labels, **rand}
        if k == 1:
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, batch, k_drop, teacher_params, state.step, time_edges
            )
        else:
            (loss, aux), grads = accumulate_micro_batches(
                loss_fn, state.params, batch, k_drop, teacher_params, state.step, k=k,
                shards=shards, batch_sharding=batch_sharding, time_edges=time_edges, cm=cm,
                mask_nonfinite=mask_nonfinite,
            )  # fmt: skip
        new_state, grad_norm, ok = guarded_update(
            state, loss, grads, tx, batch_size=batch_size, power_std=power_std,
            halflife_kimg=halflife_kimg,
        )  # fmt: skip
        values = _step_values(loss, aux, grad_norm, ok, schedule(state.step), consistency=cm)
        return new_state, values

    return train_step


def objective_loss_fn(
    entry: objectives.Objective, apply_fn: ApplyFn, weight_fn: Any,
    teacher_apply_fn: ApplyFn | None, *, sigma_d: float, cm_options: Mapping[str, Any],
    stochastic: bool,
) -> Callable[..., tuple[Array, dict[str, Array]]]:  # fmt: skip
    """``loss_fn(params, batch, k_drop, teacher_params, step, edges) -> (loss, aux)``: the
    objective's loss from the table (diffusion_loss, sct_loss or scd_loss) on a batch of
    :func:`draw_randomness`, with per-sample dropout keys when the network has dropout."""

    def loss_fn(params, batch, k_drop, teacher_params, step, edges):
        x0, z, t, labels = batch["x0"], batch["z"], batch["t"], batch.get("labels")
        key = k_drop
        if stochastic:
            key = jax.vmap(jax.random.fold_in, (None, 0))(k_drop, batch["row"])
        common = {"sigma_d": sigma_d, "labels": labels, "key": key, "time_edges": edges}
        if not entry.scm_term:  # diffusion_loss
            return entry.loss(apply_fn, weight_fn, params, x0, z, t, **common)
        cm_kw = {**common, "step": step, **cm_options}
        if not entry.tangent_from_teacher:  # sct_loss
            return entry.loss(apply_fn, weight_fn, params, x0, z, t, **cm_kw)
        return entry.loss(  # scd_loss
            apply_fn, weight_fn, params, teacher_apply_fn, teacher_params, x0, z, t,
            guidance=batch.get("guidance"), **cm_kw,
        )  # fmt: skip

    return loss_fn


def _check_step_options(
    entry: objectives.Objective, nd: NetworkDef, teacher_apply_fn: ApplyFn | None,
    guidance_range: tuple[float, float], micro_batches: Any,
) -> bool:  # fmt: skip
    """Raise ValueError for options the sCM / diffusion step cannot train; returns whether the
    student takes a per-sample CFG scale (a distilling objective and a guidance input)."""
    if entry.critic:
        raise ValueError(f"objective {entry.name!r} trains with a critic: use make_dmd_train_step")
    if entry.needs_teacher and teacher_apply_fn is None:
        raise ValueError(f"{entry.label} needs a teacher (teacher_apply_fn)")
    g_min, g_max = guidance_range
    guided = entry.needs_teacher and nd.guidance_input
    if entry.needs_teacher and not nd.guidance_input and (g_min, g_max) != (1.0, 1.0):
        raise ValueError(
            f"teacher guidance range [{g_min}, {g_max}] needs a student with a guidance input "
            "(model.guidance_input=True); or set teacher.guidance_min = guidance_max = 1"
        )
    if guided and nd.num_classes == 0:
        raise ValueError("classifier-free guidance needs a class-conditional network")
    if isinstance(micro_batches, bool) or int(micro_batches) != micro_batches or micro_batches < 1:
        raise ValueError(f"train.micro_batches must be an integer >= 1, got {micro_batches!r}")
    return bool(guided)


def draw_randomness(
    key: Array, x0: Array, *, sigma_d: float, P_mean: float, P_std: float,
    guidance_range: tuple[float, float] | None,
) -> tuple[dict[str, Array], Array]:  # fmt: skip
    """Per-sample randomness of one step's batch, and the dropout key.

    Returns ``({'z': (B, ...), 't': (B,), 'row': (B,) uint32[, 'guidance': (B,)]}, k_drop)``:
    noise z ~ N(0, sigma_d^2 I), times from the log-normal proposal, the row index that makes
    dropout per sample (``fold_in(k_drop, row)``), and with a ``guidance_range`` the CFG scale
    s ~ U[min, max].
    """
    b = x0.shape[0]
    k_z, k_t, k_drop, k_s = jax.random.split(key, 4)
    rand = {
        "z": trigflow.sample_noise(k_z, x0.shape, sigma_d, x0.dtype),
        "t": trigflow.sample_t_lognormal(k_t, (b,), P_mean, P_std, sigma_d, x0.dtype),
        "row": jnp.arange(b, dtype=jnp.uint32),
    }
    if guidance_range is not None:
        rand["guidance"] = sample_guidance_scale(k_s, b, *guidance_range, x0.dtype)
    return rand, k_drop


def _step_values(
    loss: Array, aux: dict[str, Array], grad_norm: Array, ok: Array, learning_rate: Array, *,
    consistency: bool,
) -> dict[str, Array]:  # fmt: skip
    """The step's metric values (scalars and the per-time-bin loss), see make_train_step."""
    values = {
        "loss": loss,
        "mse": aux["mse"],
        "w_mean": aux["w_mean"],
        "loss_per_time_bin": aux["loss_per_time_bin"],
        "grad_norm": grad_norm,
        "learning_rate": learning_rate,
        "nonfinite_steps": 1.0 - ok.astype(jnp.float32),
    }
    if consistency:
        values.update(
            tangent_norm=aux["g_norm_mean"],
            tangent_norm_std=aux["g_norm_std"],
            tangent_norm_max=aux["g_norm_max"],
            nonfinite=aux["nonfinite_fraction"],
            warmup_r=aux["r"],
        )
    return values


def guarded_update(
    state: TrainState, loss: Array, grads: Any, tx: optax.GradientTransformation, *,
    batch_size: int, power_std: Sequence[float], halflife_kimg: float, **replace: Any,
) -> tuple[TrainState, Array, Array]:  # fmt: skip
    """The update of one step, skipped when it is not finite (the sCM and the DMD step share it).

    Applies ``tx`` to ``grads`` (then ``project_weights``) and updates the EMAs at the new image
    count; where ``loss`` or the gradient norm is not finite, the parameters, optimiser state
    and EMAs stay as they were (only the step counter advances). ``replace``: other fields of
    the new state (DMD: the updated critic).

    Returns:
      ``(new_state, grad_norm () float32, ok () bool)``.
    """
    grad_norm = optax.tree_utils.tree_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = project_weights(optax.apply_updates(state.params, updates))
    params = _tree_where(ok, params, state.params)
    nimg = (state.step + 1).astype(jnp.float32) * batch_size
    emas = ema_lib.update_emas(
        state.emas, params["net"], nimg, batch_size, power_std, halflife_kimg
    )
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=_tree_where(ok, opt_state, state.opt_state),
        emas=_tree_where(ok, emas, state.emas), **replace,
    )  # fmt: skip
    return new_state, grad_norm, ok


def check_micro_batches(batch_size: int, micro_batches: int, shards: int = 1) -> None:
    """Raise ValueError unless ``batch_size`` splits into ``micro_batches`` equal micro-batches,
    each divisible over the ``shards`` devices that split the batch (data x fsdp)."""
    ways = micro_batches * shards
    if batch_size % ways:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by train.micro_batches {micro_batches} x "
            f"{shards} batch shards (data x fsdp devices) = {ways}; choose a batch_size that is a "
            f"multiple of {ways} or another micro_batches"
        )
