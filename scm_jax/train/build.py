"""The one builder of the training step from a config (floor 5: train).

:func:`train_step_from_config` turns a config's options into the step of its objective (the
sCM / diffusion step of ``train.step``, or the generator + critic step of ``train.step_dmd`` for
objectives with a critic, as the objective table says), :func:`state_fn` its initial
:class:`~scm_jax.run.state.TrainState`, and :func:`jit_train_step` jits the step the way training
runs it (the state donated, the new state in its shardings, the metric values replicated). The
training loop, ``scm-jax info --compile``, AOT compilation (``train.aot``), the benchmarks and
the tests all build their step here, so what they compile is the step that trains.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scm_jax import objectives
from scm_jax.config.durations import resolve_durations
from scm_jax.guidance import ApplyFn
from scm_jax.losses import proposal_time_edges
from scm_jax.networks import NetworkDef, build_network
from scm_jax.optim import make_optimizer
from scm_jax.run.state import TrainState, init_state
from scm_jax.sharding import batch_sharding
from scm_jax.train import dmd_config
from scm_jax.train.metrics import NUM_TIME_BINS
from scm_jax.train.step import StepFn, make_train_step


def teacher_model_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The sCD teacher's network: the student's architecture without the guidance input.

    (Training loads the real teacher with the config saved in its own run directory.)
    """
    cfg = dict(model_cfg)
    cfg.update(guidance_input=False, dropout=0.0)
    return cfg


def with_overrides(
    config: ml_collections.ConfigDict, *, batch_size: int | None = None,
    micro_batches: int | None = None, remat: str | None = None,
) -> ml_collections.ConfigDict:  # fmt: skip
    """A copy of ``config`` with ``batch_size``, ``train.micro_batches`` and ``model.remat``
    replaced where given (None: keep the config's value)."""
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        if batch_size is not None:
            cfg.batch_size = int(batch_size)
        if micro_batches is not None:
            cfg.train.micro_batches = int(micro_batches)
        if remat is not None:
            cfg.model.remat = remat
    return cfg


def ema_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{'power_std', 'halflife_kimg'}`` of ``config.ema`` (``init_state`` / the step), the
    half-life resolved from ``ema.halflife_fraction`` where that is set."""
    ema = resolve_durations(config).ema
    return {"power_std": tuple(ema.power_std), "halflife_kimg": ema.halflife_kimg}


def train_step_from_config(
    config: ml_collections.ConfigDict, nd: NetworkDef, teacher_apply_fn: ApplyFn | None = None,
    *, mesh: Mesh | None = None, tx: optax.GradientTransformation | None = None,
    schedule: Any = None,
) -> StepFn:  # fmt: skip
    """The (unjitted) training step of ``config``: ``make_train_step`` with the config's options.

    Args:
      config: a resolved config; reads objective, trigflow, loss, teacher guidance range, ema,
        batch_size and ``train.micro_batches``.
      nd: the network being trained (``build_network(config.model)``).
      teacher_apply_fn: sCD's teacher (``Teacher.apply_fn``); None for the other objectives.
      mesh: the device mesh; the batch is split by ``batch_sharding(mesh, config.mesh.rules)``
        (None: an unsharded batch).
      tx, schedule: the optimiser and its schedule; default ``make_optimizer(**config.optim)``.
    Returns:
      ``step(state, x0 (B, ...) float32, labels (B,) int32 | None, teacher_params)`` ->
      ``(state, values)`` (``scm_jax.train.step.make_train_step``).
    Raises:
      ValueError: options ``make_train_step`` refuses (one clear message).
    """
    config = resolve_durations(config)  # warm-up and DMD start in steps
    if objectives.get(config.objective).critic:  # DMD / rCM: generator + critic (step_dmd)
        return dmd_config.dmd_step_from_config(
            config, nd, teacher_apply_fn, mesh=mesh, tx=tx, schedule=schedule
        )
    if tx is None or schedule is None:
        tx, schedule = make_optimizer(**config.optim, batch_size=config.batch_size)
    sigma_d = float(config.trigflow.sigma_d)
    cm = objectives.get(config.objective).consistency
    loss = config.loss
    return make_train_step(
        nd, tx, schedule, objective=config.objective, sigma_d=sigma_d,
        P_mean=config.trigflow.P_mean, P_std=config.trigflow.P_std,
        batch_size=config.batch_size, **ema_options(config),
        loss_options={
            "warmup_steps": loss.tangent_warmup_steps, "warmup_form": loss.warmup_form,
            "tangent_norm": loss.tangent_norm, "tangent_c": loss.tangent_c,
            "mask_nonfinite": loss.mask_nonfinite,
        } if cm else None,
        adaptive_weighting=loss.adaptive_weighting,
        teacher_apply_fn=teacher_apply_fn,
        guidance_range=(config.teacher.guidance_min, config.teacher.guidance_max),
        time_edges=proposal_time_edges(
            config.trigflow.P_mean, config.trigflow.P_std, sigma_d, NUM_TIME_BINS
        ),
        micro_batches=int(config.train.get("micro_batches", 1)),
        batch_sharding=None if mesh is None else batch_sharding(mesh, config.mesh.rules),
    )  # fmt: skip


def jit_train_step(step_fn: StepFn, state_shardings: TrainState, mesh: Mesh) -> Any:
    """``jax.jit`` of the step as training runs it: the state argument donated, the new state in
    ``state_shardings`` and the metric values replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings, replicated))


def abstract_train_state(
    config: ml_collections.ConfigDict, nd: NetworkDef, tx: optax.GradientTransformation
) -> TrainState:
    """The train state of ``config`` as ``jax.ShapeDtypeStruct`` leaves (nothing materialised)."""
    return jax.eval_shape(state_fn(config, nd, tx), jax.random.key(0))


def state_fn(
    config: ml_collections.ConfigDict, nd: NetworkDef, tx: optax.GradientTransformation,
    *, per_leaf: bool = False,
) -> Any:  # fmt: skip
    """``make_state(key, init_net=None) -> TrainState`` of ``config``: ``init_state``, or with
    the critic for DMD / rCM (``dmd_config.dmd_state_fn``)."""
    if objectives.get(config.objective).critic:
        return dmd_config.dmd_state_fn(config, nd, tx, per_leaf=per_leaf)

    def make_state(key: jax.Array, init_net: Any = None) -> TrainState:
        return init_state(nd, tx, key, **ema_options(config), init_net=init_net, per_leaf=per_leaf)

    return make_state


def abstract_teacher(
    config: ml_collections.ConfigDict,
) -> tuple[ApplyFn | None, Any]:
    """The teacher (sCD, DMD, rCM) without a checkpoint: ``(apply_fn, abstract net params or
    None)``.

    A network teacher has the student's architecture (:func:`teacher_model_config`); the toy
    config's exact mixture teacher has no parameters. Other objectives: ``(None, None)``.
    """
    if not objectives.get(config.objective).needs_teacher:
        return None, None
    if config.teacher.get("kind", "network") == "exact_gmm":
        from scm_jax.gmm import GaussianMixture, teacher_apply_fn

        gmm = GaussianMixture.from_dict(
            {k: config.dataset[k] for k in ("means", "stds", "weights")}
        )
        return teacher_apply_fn(gmm, config.trigflow.sigma_d), None
    teacher = build_network(teacher_model_config(config.model))
    return teacher.apply_fn, teacher.abstract_params()["net"]
