"""The training step of DMD (DMD / DMD2) and rCM: k critic updates, then one generator update,
in one jitted, state-donating step (reference §7, §8; docs/method.md#dmd-and-rcm).

State: ``TrainState.critic = {'params': {'net', 'weight'}, 'opt_state'}`` is the fake score
F_fake -- the student's architecture, started from the student's initial weights (the teacher's
EMA, or ``init_from``) with a fresh weighting head -- and its optimiser state. Its leaves have the
student's paths under ``critic``, so the sharding rules split it exactly like the student.

One step (``state.step`` counts generator updates, the unit of ``total_kimg``, the learning-rate
schedule and the EMAs; it reads one data batch):

1. k = ``dmd.critic_updates`` critic updates (unrolled; ``unroll_critic``): draw a stop-gradient
   rollout of the student (``losses.rollout``), then one optimiser step of the critic on the
   TrigFlow diffusion loss of those samples (``diffusion_loss``; learned weighting optional),
   skipped if not finite;
2. the generator: a rollout with gradient through its last step; the DMD loss against the
   updated critic and the (CFG-)teacher at t ~ p_D (``dmd_generator_loss``), times
   ``dmd.weight`` from ``dmd.start_step`` on; DMD's regression term (optional); for rCM plus
   the sCD loss of the data batch. Optimiser, forced weight-normalisation projection and EMAs as
   in ``scm_jax.train.step``; a step whose loss or gradient is not finite changes nothing.

Why k updates inside one step and not one update per step chosen by ``lax.cond(step % k)``: a
step is then exactly one generator update (so ``total_kimg``, the schedule, the EMA and a
checkpoint mean the same as for sCM, and equal budgets compare directly); every step costs the
same; no data batch is read and left unused on critic-only steps; and both networks report
metrics every step. The critic's learning-rate schedule follows the generator's images.

Gradient accumulation (``train.micro_batches`` > 1) is not implemented for these objectives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from scm_jax import objectives, trigflow
from scm_jax.guidance import ApplyFn, sample_guidance_scale
from scm_jax.losses import (
    consistency_loss,
    diffusion_loss,
    dmd_generator_loss,
    fixed_rollout_times,
    proposal_time_edges,
    random_rollout_times,
    regression_loss,
    sample_num_steps,
    student_rollout,
    teacher_velocity,
)
from scm_jax.networks import NetworkDef, project_weights
from scm_jax.objectives import ROLLOUTS
from scm_jax.run.state import TrainState, init_state, merge_params
from scm_jax.sampling import consistency_times, sample_ode
from scm_jax.train.step import (
    StepFn,
    _batch_layout,
    _has_dropout,
    _per_sample_dropout,
    _tree_where,
    check_micro_batches,
    guarded_update,
)

Array = jax.Array
PAIRS_KEY = 0xFFFFFFFF  # fold_in index of the fixed regression-noise pool (steps never reach it)


@dataclasses.dataclass(frozen=True)
class DMDOptions:
    """The ``dmd`` config section as step options (``defaults.DMD_DEFAULTS`` documents them)."""

    weight: float = 1.0
    start_step: int = 0
    P_mean: float = -0.6931
    P_std: float = 1.6
    critic_updates: int = 1
    critic_adaptive_weighting: bool = True
    critic_P_mean: float = -1.0  # noqa: N815 (the config's name)
    critic_P_std: float = 1.6  # noqa: N815
    generator_steps: int = 1
    rollout: str = "fixed"
    regression_weight: float = 0.0
    regression_steps: int = 18
    regression_batch: int = 0
    regression_pairs: int = 0

    @classmethod
    def from_config(cls, dmd: Mapping[str, Any]) -> DMDOptions:
        """From ``config.dmd`` (its ``critic_lr`` belongs to :func:`critic_optimizer`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(dmd).items() if k in names})


def init_critic(
    nd: NetworkDef, critic_tx: optax.GradientTransformation, key: Array, *,
    init_net: Any = None, per_leaf: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """``{'params', 'opt_state'}`` of a fresh critic, its network from ``init_net`` if given."""
    params = nd.init_per_leaf(key) if per_leaf else nd.init(key)
    if init_net is not None:
        params = {**params, "net": merge_params(params["net"], init_net)[0]}
    return {"params": params, "opt_state": critic_tx.init(params)}


def init_dmd_state(
    nd: NetworkDef, tx: optax.GradientTransformation, critic_tx: optax.GradientTransformation,
    key: Array, *, power_std: Sequence[float], halflife_kimg: float, init_net: Any = None,
    per_leaf: bool = False,
) -> TrainState:  # fmt: skip
    """``train.state.init_state`` plus the critic, both networks from ``init_net`` if given."""
    state = init_state(nd, tx, key, power_std=power_std, halflife_kimg=halflife_kimg,
                       init_net=init_net, per_leaf=per_leaf)  # fmt: skip
    critic = init_critic(nd, critic_tx, jax.random.fold_in(key, 1), init_net=init_net,
                         per_leaf=per_leaf)  # fmt: skip
    return state.replace(critic=critic)


def make_dmd_train_step(
    nd: NetworkDef,
    tx: optax.GradientTransformation,
    schedule: Callable[[Array], Array],
    critic_tx: optax.GradientTransformation,
    *,
    objective: str,
    options: DMDOptions,
    sigma_d: float,
    P_mean: float,
    P_std: float,
    batch_size: int,
    power_std: Sequence[float],
    halflife_kimg: float,
    teacher_apply_fn: ApplyFn | None,
    sigma_max: float = 80.0,
    t_mid: float = 1.1,
    loss_options: Mapping[str, Any] | None = None,
    adaptive_weighting: bool = True,
    guidance_range: tuple[float, float] = (1.0, 1.0),
    time_edges: tuple[float, ...] | None = None,
    batch_sharding: NamedSharding | None = None,
    unroll_critic: bool = True,
) -> StepFn:
    """The (unjitted) DMD / rCM training step (module docstring).

    Args:
      nd, tx, schedule: the student and its optimiser; critic_tx: the critic's optimiser.
      objective: ``'dmd'`` or ``'rcm'``; options: the ``dmd`` section (:class:`DMDOptions`).
      sigma_d: data std; P_mean, P_std: rCM's sCD proposal.
      batch_size, power_std, halflife_kimg: global batch and the EMA profiles.
      teacher_apply_fn: the teacher (``ApplyFn``; its parameters are the step's argument).
      sigma_max, t_mid: the sampler's start noise level and 2-step time: the one-step generator
        input is t_max = arctan(sigma_max / sigma_d), fixed rollouts use the sampler's times.
      loss_options, adaptive_weighting: rCM's sCD options (``scm_jax.train.step``). The DMD term
        takes the sCD term's reduction: per-sample sums when w_phi is learned (e^{w} / D ~ 1 /
        ||g||^2 ~ 1 with normalised tangents), means over elements without it, so that lambda
        keeps rCM's meaning (a ratio of sum-reduced losses).
      guidance_range: CFG scales s ~ U[min, max] of the teacher; a student with a guidance
        input receives s (so does the critic); without one the range must be one scale.
      time_edges: rCM's sCD time bins; DMD's per-bin loss uses p_D's quartiles.
      batch_sharding: the batch's sharding (per-sample dropout keeps rows local).
      unroll_critic: write the k critic updates as straight-line code (default) instead of a
        ``lax.scan`` loop. The same arithmetic; XLA:CPU ran the looped updates about 14x slower
        (``benchmarks/dmd_critic_loop.py``); a loop compiles the critic's update once.
    Returns:
      ``step(state, x0, labels, teacher_params) -> (state, values)`` as ``make_train_step``;
      ``values``: loss, dmd_loss, critic_loss, critic_grad_norm, critic_skipped, grad_norm,
      learning_rate, nonfinite_steps, loss_per_time_bin, regression_loss (when on), and for rCM
      mse, w_mean, tangent_norm(_std, _max), nonfinite, warmup_r.
    Raises:
      ValueError: an unknown objective or rollout, no teacher, or guidance the student cannot take.
    """
    entry = objectives.get(objective)
    if not entry.critic:
        choices = ", ".join(objectives.names_where(lambda o: o.critic))
        raise ValueError(f"objective {objective!r} has no critic; the DMD step trains {choices}")
    if teacher_apply_fn is None:
        raise ValueError(f"{entry.label} needs a teacher (teacher_apply_fn)")
    if options.rollout not in ROLLOUTS:
        raise ValueError(f"unknown dmd.rollout {options.rollout!r}; expected one of {ROLLOUTS}")
    g_min, g_max = (float(v) for v in guidance_range)
    if not nd.guidance_input and g_min != g_max:
        raise ValueError(
            f"teacher guidance range [{g_min}, {g_max}] needs a student with a guidance input "
            "(model.guidance_input=True); or set teacher.guidance_min = guidance_max"
        )
    guided = (g_min, g_max) != (1.0, 1.0)
    if guided and nd.num_classes == 0:
        raise ValueError("classifier-free guidance needs a class-conditional network")
    batch_axes, shards = _batch_layout(batch_sharding)
    check_micro_batches(batch_size, 1, shards)
    rcm = entry.scm_term  # rCM: DMD plus sCD's consistency term
    stochastic = _has_dropout(nd)
    apply_fn = _per_sample_dropout(nd.apply_fn, batch_axes) if stochastic else nd.apply_fn
    weight_fn = nd.weight_fn if adaptive_weighting else None
    critic_weight_fn = nd.weight_fn if options.critic_adaptive_weighting else None
    reduction = "sum" if rcm and adaptive_weighting else "mean"
    cm_options = dict(loss_options or {})
    t_max = trigflow.t_max(sigma_max, sigma_d)
    N, k = int(options.generator_steps), int(options.critic_updates)
    fixed_times = consistency_times(N, t_max, t_mid) if options.rollout == "fixed" else None
    num_bins = 4 if time_edges is None else len(time_edges) + 1
    dmd_edges = proposal_time_edges(options.P_mean, options.P_std, sigma_d, num_bins)

    def inputs(key: Array, b: int, dtype: Any) -> tuple[Array | None, Array | None]:
        """(the student's guidance input, the teacher's CFG scales), each ``(B,)`` or None."""
        if nd.guidance_input:
            s = sample_guidance_scale(key, b, g_min, g_max, dtype)
            return s, (s if guided else None)
        return None, (jnp.full((b,), g_min, dtype) if guided else None)

    def drop_keys(key: Array, b: int) -> Array:
        """Per-sample dropout keys (``step._per_sample_dropout``), or the one key."""
        if not stochastic:
            return key
        return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(b, dtype=jnp.uint32))

    def rollout(net: Any, key: Array, x0: Array, labels, guidance, drop) -> Array:
        """The student's sample x0 ``(B, ...)``, differentiable through the last step only."""
        b = x0.shape[0]
        k_z, k_n, k_t, k_renoise = jax.random.split(key, 4)
        z = trigflow.sample_noise(k_z, x0.shape, sigma_d, x0.dtype)
        if fixed_times is not None:
            times = fixed_rollout_times(fixed_times, b, x0.dtype)
        else:
            times = random_rollout_times(k_t, b, N, t_max, options.P_mean, options.P_std,
                                         sigma_d, x0.dtype)  # fmt: skip
        return student_rollout(
            apply_fn, net, z, times, sample_num_steps(k_n, N), k_renoise, sigma_d=sigma_d,
            labels=labels, guidance=guidance, dropout_key=drop,
        )[0]  # fmt: skip

    def critic_update(critic, i, gen_net, x0, labels, guidance, key):
        k_roll, k_eps, k_t, k_drop = jax.random.split(jax.random.fold_in(key, i), 4)
        b = x0.shape[0]
        x_gen = jax.lax.stop_gradient(rollout(jax.lax.stop_gradient(gen_net), k_roll, x0, labels,
                                              guidance, None))  # fmt: skip
        eps = trigflow.sample_noise(k_eps, x0.shape, sigma_d, x0.dtype)
        t = trigflow.sample_t_lognormal(k_t, (b,), options.critic_P_mean, options.critic_P_std,
                                        sigma_d, x0.dtype)  # fmt: skip

        def loss_fn(p):
            drop = drop_keys(k_drop, b)
            return diffusion_loss(apply_fn, critic_weight_fn, p, x_gen, eps, t, sigma_d=sigma_d,
                                  labels=labels, guidance=guidance, key=drop)[0]  # fmt: skip

        loss, grads = jax.value_and_grad(loss_fn)(critic["params"])
        g_norm = optax.tree_utils.tree_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(g_norm)
        updates, opt_state = critic_tx.update(grads, critic["opt_state"], critic["params"])
        params = project_weights(optax.apply_updates(critic["params"], updates))
        new = {"params": params, "opt_state": opt_state}
        return _tree_where(ok, new, critic), (loss, g_norm, ok)

    def regression(params, key, pool, x0, labels, guidance, g_teacher, drop, teacher_params):
        """DMD's regression term on ``regression_batch`` samples (0: the batch); ``pool``: the
        key of the fixed noise pool (``regression_pairs``)."""
        b = x0.shape[0]
        r = int(options.regression_batch) or b
        k_idx, k_z = jax.random.split(key)
        shape = (r, *x0.shape[1:])
        if options.regression_pairs:
            idx = jax.random.randint(k_idx, (r,), 0, int(options.regression_pairs))
            z = jax.vmap(lambda i: trigflow.sample_noise(jax.random.fold_in(pool, i), shape[1:],
                                                         sigma_d, x0.dtype))(idx)  # fmt: skip
        else:
            z = trigflow.sample_noise(k_z, shape, sigma_d, x0.dtype)
        cut = lambda a: None if a is None else a[:r]  # noqa: E731
        y, _ = sample_ode(
            teacher_apply_fn, teacher_params, z, shape, int(options.regression_steps), sigma_d,
            "heun", sigma_max=sigma_max, labels=cut(labels), guidance_scale=cut(g_teacher),
        )  # fmt: skip
        tt = jnp.full((r,), t_max, x0.dtype)
        d = drop if drop is None or drop.ndim == 0 else drop[:r]
        F = apply_fn(params["net"], z / sigma_d, tt, cut(labels), cut(guidance), d)
        x0_reg = trigflow.consistency_fn(z, tt, F, sigma_d)
        return jnp.mean(regression_loss(x0_reg, jax.lax.stop_gradient(y), reduction))

    def gen_loss(params, x0, labels, guidance, g_teacher, key, pool, teacher_params, critic_net,
                 step):  # fmt: skip
        k_roll, k_eps, k_t, k_drop, k_reg, k_z, k_tc = jax.random.split(key, 7)
        b = x0.shape[0]
        drop = drop_keys(k_drop, b)
        x_gen = rollout(params["net"], k_roll, x0, labels, guidance, drop)
        eps = trigflow.sample_noise(k_eps, x0.shape, sigma_d, x0.dtype)
        t = trigflow.sample_t_lognormal(k_t, (b,), options.P_mean, options.P_std, sigma_d,
                                        x0.dtype)  # fmt: skip
        l_dmd, aux_dmd = dmd_generator_loss(
            nd.apply_fn, critic_net, teacher_apply_fn, teacher_params, x_gen, eps, t,
            sigma_d=sigma_d, labels=labels, guidance=guidance, teacher_guidance=g_teacher,
            reduction=reduction, time_edges=dmd_edges,
        )  # fmt: skip
        on = (step >= options.start_step).astype(jnp.float32)
        loss = options.weight * on * l_dmd
        aux = {"dmd_loss": l_dmd, "loss_per_time_bin": aux_dmd["loss_per_time_bin"]}
        if options.regression_weight:
            l_reg = regression(params, k_reg, pool, x0, labels, guidance, g_teacher, drop,
                               teacher_params)  # fmt: skip
            loss = loss + options.regression_weight * l_reg
            aux["regression_loss"] = l_reg
        if rcm:  # sCD on the data batch (the teacher guided at g_teacher, the student given s)
            z = trigflow.sample_noise(k_z, x0.shape, sigma_d, x0.dtype)
            tc = trigflow.sample_t_lognormal(k_tc, (b,), P_mean, P_std, sigma_d, x0.dtype)
            x_t = trigflow.add_noise(x0, z, tc)
            dx_dt = teacher_velocity(teacher_apply_fn, teacher_params, x_t, tc, sigma_d=sigma_d,
                                     labels=labels, guidance=g_teacher)  # fmt: skip
            l_scd, aux_scd = consistency_loss(
                apply_fn, weight_fn, params, x_t, tc, dx_dt, sigma_d=sigma_d, step=step,
                labels=labels, guidance=guidance, key=drop, time_edges=time_edges, **cm_options,
            )  # fmt: skip
            loss = loss + l_scd
            aux.update(aux_scd)
        return loss, aux

    def train_step(state, x0, labels, teacher_params):
        check_micro_batches(x0.shape[0], 1, shards)
        key = jax.random.fold_in(state.key(), state.step)
        k_in, k_critic, k_gen = jax.random.split(key, 3)
        guidance, g_teacher = inputs(k_in, x0.shape[0], x0.dtype)

        def body(critic, i):
            return critic_update(critic, i, state.params["net"], x0, labels, guidance, k_critic)

        if unroll_critic:  # a Python loop: straight-line code even for k = 1 (scan keeps a loop)
            critic, outs = state.critic, []
            for i in range(k):
                critic, out = body(critic, jnp.int32(i))
                outs.append(out)
            c_loss, c_norm, c_ok = (jnp.stack(v) for v in zip(*outs, strict=True))
        else:
            critic, (c_loss, c_norm, c_ok) = jax.lax.scan(body, state.critic, jnp.arange(k))
        c_n = jnp.maximum(c_ok.sum(), 1)
        pool = jax.random.fold_in(state.key(), jnp.uint32(PAIRS_KEY))  # regression noise pool
        (loss, aux), grads = jax.value_and_grad(gen_loss, has_aux=True)(
            state.params, x0, labels, guidance, g_teacher, k_gen, pool, teacher_params,
            critic["params"]["net"], state.step,
        )  # fmt: skip
        new_state, grad_norm, ok = guarded_update(
            state, loss, grads, tx, batch_size=batch_size, power_std=power_std,
            halflife_kimg=halflife_kimg, critic=critic,
        )  # fmt: skip
        values = {
            "loss": loss,
            "dmd_loss": aux["dmd_loss"],
            "loss_per_time_bin": aux["loss_per_time_bin"],
            "critic_loss": jnp.where(c_ok, c_loss, 0.0).sum() / c_n,
            "critic_grad_norm": jnp.where(c_ok, c_norm, 0.0).sum() / c_n,
            "critic_skipped": 1.0 - c_ok.astype(jnp.float32).mean(),
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "nonfinite_steps": 1.0 - ok.astype(jnp.float32),
        }
        if "regression_loss" in aux:
            values["regression_loss"] = aux["regression_loss"]
        if rcm:
            values.update(
                mse=aux["mse"], w_mean=aux["w_mean"], tangent_norm=aux["g_norm_mean"],
                tangent_norm_std=aux["g_norm_std"], tangent_norm_max=aux["g_norm_max"],
                nonfinite=aux["nonfinite_fraction"], warmup_r=aux["r"],
            )  # fmt: skip
        return new_state, values

    return train_step
