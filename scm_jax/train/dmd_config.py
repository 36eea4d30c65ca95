"""DMD / rCM from a config: validation of the ``dmd`` section, the critic's optimiser, the train
state with its critic, and the step (``scm_jax.train.step_dmd``).

The training loop and ``scm_jax.train.aot`` call these for ``objective`` in
``defaults.DMD_OBJECTIVES``; :func:`validate_dmd_config` is one function a config-validation
module can call for every config (it checks nothing for the other objectives).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from scm_jax.config.durations import resolve_durations
from scm_jax.config.validate import ConfigError, dmd_problems
from scm_jax.guidance import ApplyFn
from scm_jax.losses import proposal_time_edges
from scm_jax.networks import NetworkDef
from scm_jax.optim import make_optimizer
from scm_jax.run.state import TrainState
from scm_jax.sharding import batch_sharding
from scm_jax.train.metrics import NUM_TIME_BINS
from scm_jax.train.step import StepFn
from scm_jax.train.step_dmd import DMDOptions, init_dmd_state, make_dmd_train_step


def validate_dmd_config(config: ml_collections.ConfigDict) -> None:
    """Raise ``scm_jax.config.checks.ConfigError`` (a ValueError; one line per problem) for a
    dmd / rcm config that cannot train: the ``dmd`` section's ranges, the teacher's guidance against
    the student, ``train.micro_batches`` = 1 (no gradient accumulation for DMD / rCM). Other
    objectives are not checked. ``scm-jax train`` checks the same in ``scm_jax.config.validate``.
    """
    found = dmd_problems(config)
    if found:
        raise ConfigError(found)


def critic_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
    """The fake score's optimiser: ``config.optim`` at ``dmd.critic_lr`` (0: ``optim.lr``).

    Its schedule counts generator images: the critic takes ``dmd.critic_updates`` steps per
    generator update, so its optimiser is built with batch_size / critic_updates.
    """
    lr = float(config.dmd.critic_lr) or float(config.optim.lr)
    k = max(int(config.dmd.critic_updates), 1)
    return make_optimizer(**{**config.optim, "lr": lr}, batch_size=config.batch_size / k)


def dmd_state_fn(
    config: ml_collections.ConfigDict, nd: NetworkDef, tx: optax.GradientTransformation,
    *, per_leaf: bool = False,
) -> Callable[[jax.Array, Any], TrainState]:  # fmt: skip
    """``make_state(key, init_net) -> TrainState`` with the critic (for
    ``train.state.create_sharded_state`` / ``abstract_state``)."""
    critic_tx, _ = critic_optimizer(config)
    resolved = resolve_durations(config).ema
    ema = {"power_std": tuple(resolved.power_std), "halflife_kimg": resolved.halflife_kimg}

    def make_state(key: jax.Array, init_net: Any = None) -> TrainState:
        return init_dmd_state(nd, tx, critic_tx, key, **ema, init_net=init_net, per_leaf=per_leaf)

    return make_state


def dmd_step_from_config(
    config: ml_collections.ConfigDict, nd: NetworkDef, teacher_apply_fn: ApplyFn | None, *,
    mesh: Mesh | None = None, tx: optax.GradientTransformation | None = None,
    schedule: Any = None, unroll_critic: bool = True,
) -> StepFn:  # fmt: skip
    """The (unjitted) DMD / rCM step of ``config`` (``make_dmd_train_step`` with its options);
    arguments as ``scm_jax.train.build.train_step_from_config``, ``unroll_critic`` as
    ``make_dmd_train_step``'s."""
    validate_dmd_config(config)
    config = resolve_durations(config)  # dmd.start_step, the tangent warm-up in steps
    if tx is None or schedule is None:
        tx, schedule = make_optimizer(**config.optim, batch_size=config.batch_size)
    critic_tx, _ = critic_optimizer(config)
    sigma_d = float(config.trigflow.sigma_d)
    loss = config.loss
    return make_dmd_train_step(
        nd, tx, schedule, critic_tx, objective=config.objective,
        options=DMDOptions.from_config(config.dmd), sigma_d=sigma_d,
        P_mean=config.trigflow.P_mean, P_std=config.trigflow.P_std,
        batch_size=config.batch_size, power_std=tuple(config.ema.power_std),
        halflife_kimg=config.ema.halflife_kimg, teacher_apply_fn=teacher_apply_fn,
        sigma_max=config.trigflow.sigma_max, t_mid=config.trigflow.t_mid,
        loss_options={
            "warmup_steps": loss.tangent_warmup_steps, "warmup_form": loss.warmup_form,
            "tangent_norm": loss.tangent_norm, "tangent_c": loss.tangent_c,
            "mask_nonfinite": loss.mask_nonfinite,
        },
        adaptive_weighting=loss.adaptive_weighting,
        guidance_range=(config.teacher.guidance_min, config.teacher.guidance_max),
        time_edges=proposal_time_edges(
            config.trigflow.P_mean, config.trigflow.P_std, sigma_d, NUM_TIME_BINS
        ),
        batch_sharding=None if mesh is None else batch_sharding(mesh, config.mesh.rules),
        unroll_critic=unroll_critic,
    )  # fmt: skip
