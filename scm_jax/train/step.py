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
from jax.sharding import NamedSharding, PartitionSpec

from scm_jax import ema as ema_lib
from scm_jax import objectives, trigflow
from scm_jax.guidance import ApplyFn, sample_guidance_scale
from scm_jax.networks import NetworkDef, project_weights
from scm_jax.run.state import TrainState

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


def _bin_counts(t: Array, edges: Any, num_bins: int) -> Array:
    """Samples per time bin ``(num_bins,)``, binned as ``losses.common.time_bin_means`` does."""
    bins = jnp.searchsorted(jnp.asarray(edges, t.dtype), t, side="right")
    return jax.nn.one_hot(bins, num_bins, dtype=jnp.float32).sum(axis=0)


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
    if entry.critic:
        raise ValueError(f"objective {objective!r} trains with a critic: use make_dmd_train_step")
    if entry.needs_teacher and teacher_apply_fn is None:
        raise ValueError(f"{entry.label} needs a teacher (teacher_apply_fn)")
    g_min, g_max = (float(v) for v in guidance_range)
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
    k = int(micro_batches)
    batch_axes, shards = _batch_layout(batch_sharding)
    check_micro_batches(batch_size, k, shards)
    cm = entry.consistency
    cm_options = dict(loss_options or {})
    mask_nonfinite = bool(cm_options.get("mask_nonfinite", True))
    weight_fn = nd.weight_fn if adaptive_weighting else None
    stochastic = _has_dropout(nd)
    apply_fn = _per_sample_dropout(nd.apply_fn, batch_axes) if stochastic else nd.apply_fn

    def draw(key: Array, x0: Array) -> tuple[dict[str, Array], Array]:
        """Per-sample randomness of the whole batch, and the dropout key."""
        b = x0.shape[0]
        k_z, k_t, k_drop, k_s = jax.random.split(key, 4)
        rand = {
            "z": trigflow.sample_noise(k_z, x0.shape, sigma_d, x0.dtype),
            "t": trigflow.sample_t_lognormal(k_t, (b,), P_mean, P_std, sigma_d, x0.dtype),
            "row": jnp.arange(b, dtype=jnp.uint32),  # per-sample dropout: fold_in(k_drop, row)
        }
        if guided:
            rand["guidance"] = sample_guidance_scale(k_s, b, g_min, g_max, x0.dtype)
        return rand, k_drop

    def loss_fn(params, batch, k_drop, teacher_params, step, edges):
        x0, z, t, labels = batch["x0"], batch["z"], batch["t"], batch.get("labels")
        key = k_drop
        if stochastic:
            key = jax.vmap(jax.random.fold_in, (None, 0))(k_drop, batch["row"])
        common = {"sigma_d": sigma_d, "labels": labels, "key": key, "time_edges": edges}
        if not entry.scm_term:  # the objective's loss (objectives table): diffusion_loss
            return entry.loss(apply_fn, weight_fn, params, x0, z, t, **common)
        cm_kw = {**common, "step": step, **cm_options}
        if not entry.tangent_from_teacher:  # sct_loss
            return entry.loss(apply_fn, weight_fn, params, x0, z, t, **cm_kw)
        return entry.loss(  # scd_loss
            apply_fn, weight_fn, params, teacher_apply_fn, teacher_params, x0, z, t,
            guidance=batch.get("guidance"), **cm_kw,
        )  # fmt: skip

    def split(a: Array) -> Array:
        """``(B, ...)`` -> ``(k, B / k, ...)``, micro-batch j = block j of every shard's rows."""
        a = a.reshape((shards, k, -1, *a.shape[1:]))
        a = jnp.swapaxes(a, 0, 1).reshape((k, -1, *a.shape[3:]))
        if batch_sharding is None:
            return a
        spec = PartitionSpec(None, *batch_sharding.spec)
        return jax.lax.with_sharding_constraint(a, NamedSharding(batch_sharding.mesh, spec))

    def accumulated(params, batch, k_drop, teacher_params, step):
        """``((loss, aux), grads)`` of the whole batch from k micro-batches (module docstring)."""
        edges = time_edges
        if edges is None:  # the whole batch's quartiles, as time_bin_means would take them
            t = batch["t"]
            edges = jnp.quantile(t, jnp.array([0.25, 0.5, 0.75], t.dtype))
        num_bins = len(edges) + 1

        def body(acc, mb):
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, mb, k_drop, teacher_params, step, edges
            )
            n = jnp.float32(mb["t"].shape[0])
            n_fin = jnp.round((1.0 - aux["nonfinite_fraction"]) * n) if cm else n
            n_keep = n_fin if cm and mask_nonfinite else n  # the loss's denominator
            counts = _bin_counts(mb["t"], edges, num_bins)
            out = {
                "grads": jax.tree.map(lambda s, g: s + n_keep * g, acc["grads"], grads),
                "n_keep": acc["n_keep"] + n_keep,
                "loss": acc["loss"] + n_keep * loss,
                "mse": acc["mse"] + n_keep * aux["mse"],
                "w_mean": acc["w_mean"] + n * aux["w_mean"],
                "bin_totals": acc["bin_totals"] + counts * aux["loss_per_time_bin"],
                "bin_counts": acc["bin_counts"] + counts,
            }
            if cm:  # tangent norms of finite samples: count, mean, M2 (Chan et al.), max
                n_a, mean_a = acc["g_n"], acc["g_mean"]
                n_ab = n_a + n_fin
                delta = aux["g_norm_mean"] - mean_a
                frac = n_fin / jnp.maximum(n_ab, 1.0)
                m2_b = aux["g_norm_std"] ** 2 * n_fin
                out.update(
                    g_n=n_ab,
                    g_mean=mean_a + delta * frac,
                    g_m2=acc["g_m2"] + m2_b + delta**2 * n_a * frac,
                    g_max=jnp.maximum(acc["g_max"], aux["g_norm_max"]),
                    nonfinite=acc["nonfinite"] + n * aux["nonfinite_fraction"],
                    r=aux["r"],
                )
            return jax.tree.map(lambda new, old: new.astype(old.dtype), out, acc), None

        zero = jnp.float32(0.0)
        init = {
            "grads": jax.tree.map(
                lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params
            ),
            "n_keep": zero, "loss": zero, "mse": zero, "w_mean": zero,
            "bin_totals": jnp.zeros((num_bins,), jnp.float32),
            "bin_counts": jnp.zeros((num_bins,), jnp.float32),
        }  # fmt: skip
        if cm:
            init.update(g_n=zero, g_mean=zero, g_m2=zero, g_max=zero, nonfinite=zero, r=zero)
        xs = {name: split(a) for name, a in batch.items() if a is not None}
        acc, _ = jax.lax.scan(body, init, xs)
        b = jnp.float32(batch["t"].shape[0])
        denom = jnp.maximum(acc["n_keep"], 1.0)
        grads = jax.tree.map(lambda s, p: (s / denom).astype(p.dtype), acc["grads"], params)
        aux = {
            "mse": acc["mse"] / denom,
            "w_mean": acc["w_mean"] / b,
            "loss_per_time_bin": acc["bin_totals"] / jnp.maximum(acc["bin_counts"], 1.0),
        }
        if cm:
            aux.update(
                g_norm_mean=acc["g_mean"],
                g_norm_std=jnp.sqrt(acc["g_m2"] / jnp.maximum(acc["g_n"], 1.0)),
                g_norm_max=acc["g_max"],
                nonfinite_fraction=acc["nonfinite"] / b,
                r=acc["r"],
            )
        return (acc["loss"] / denom, aux), grads

    def train_step(state, x0, labels, teacher_params):
        check_micro_batches(x0.shape[0], k, shards)
        key = jax.random.fold_in(state.key(), state.step)
        rand, k_drop = draw(key, x0)
        batch = {"x0": x0, "labels": labels, **rand}
        if k == 1:
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, batch, k_drop, teacher_params, state.step, time_edges
            )
        else:
            (loss, aux), grads = accumulated(
                state.params, batch, k_drop, teacher_params, state.step
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
        if cm:
            values.update(
                tangent_norm=aux["g_norm_mean"],
                tangent_norm_std=aux["g_norm_std"],
                tangent_norm_max=aux["g_norm_max"],
                nonfinite=aux["nonfinite_fraction"],
                warmup_r=aux["r"],
            )
        return new_state, values

    return train_step


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
