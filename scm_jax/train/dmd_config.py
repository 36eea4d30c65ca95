"""DMD / rCM from a config: validation of the ``dmd`` section, the critic's optimiser, the train
state with its critic, and the step (``scm_jax.train.step_dmd``).

The training loop and ``scm_jax.train.aot`` call these for ``objective`` in
``configlib.DMD_OBJECTIVES``; :func:`validate_dmd_config` is one function a config-validation
module can call for every config (it checks nothing for the other objectives).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from scm_jax.configlib import DMD_OBJECTIVES
from scm_jax.guidance import ApplyFn
from scm_jax.losses import proposal_time_edges
from scm_jax.networks import NetworkDef
from scm_jax.optim import make_optimizer
from scm_jax.sharding import batch_sharding
from scm_jax.train.state import TrainState
from scm_jax.train.step import StepFn
from scm_jax.train.step_dmd import ROLLOUTS, DMDOptions, init_dmd_state, make_dmd_train_step

NUM_TIME_BINS = 4  # the training loop's per-time-bin loss metrics


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def validate_dmd_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError (naming the field and the fix) for a dmd / rcm config that cannot train.

    Checks the ``dmd`` section's ranges, that the teacher's guidance fits the student, and that
    ``train.micro_batches`` is 1 (gradient accumulation is not implemented for DMD / rCM). Other
    objectives are not checked.
    """
    if config.objective not in DMD_OBJECTIVES:
        return
    d = config.dmd
    for name in ("critic_updates", "generator_steps", "regression_steps"):
        if not _is_int(d[name], 1):
            raise ValueError(f"dmd.{name} must be an integer >= 1, got {d[name]!r}")
    for name in ("start_step", "regression_batch", "regression_pairs"):
        if not _is_int(d[name], 0):
            raise ValueError(f"dmd.{name} must be an integer >= 0, got {d[name]!r}")
    for name in ("weight", "critic_lr", "regression_weight"):
        if not d[name] >= 0:
            raise ValueError(f"dmd.{name} must be >= 0, got {d[name]!r}")
    for name in ("P_std", "critic_P_std"):
        if not d[name] > 0:
            raise ValueError(f"dmd.{name} must be > 0, got {d[name]!r}")
    if d.rollout not in ROLLOUTS:
        raise ValueError(f"unknown dmd.rollout {d.rollout!r}; choose one of {', '.join(ROLLOUTS)}")
    if d.regression_batch > config.batch_size:
        raise ValueError(
            f"dmd.regression_batch ({d.regression_batch}) exceeds batch_size "
            f"({config.batch_size}); use at most the batch (0 = the whole batch)"
        )
    g_min, g_max = config.teacher.guidance_min, config.teacher.guidance_max
    if not 0 <= g_min <= g_max:
        raise ValueError(f"need 0 <= teacher.guidance_min <= guidance_max, got [{g_min}, {g_max}]")
    if g_min != g_max and not config.model.get("guidance_input", False):
        raise ValueError(
            f"teacher guidance range [{g_min}, {g_max}] needs model.guidance_input=True; a "
            "student without it distils one fixed scale (guidance_min = guidance_max)"
        )
    if (g_min, g_max) != (1.0, 1.0) and not config.model.get("num_classes", 0):
        raise ValueError("classifier-free guidance of the teacher needs a class-conditional model")
    if config.train.get("micro_batches", 1) != 1:
        raise ValueError(
            f"train.micro_batches={config.train.micro_batches}: gradient accumulation is not "
            f"implemented for objective {config.objective}; set train.micro_batches=1 and a "
            "batch_size (or more devices) that fits"
        )


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
    ema = {"power_std": tuple(config.ema.power_std), "halflife_kimg": config.ema.halflife_kimg}

    def make_state(key: jax.Array, init_net: Any = None) -> TrainState:
        return init_dmd_state(nd, tx, critic_tx, key, **ema, init_net=init_net, per_leaf=per_leaf)

    return make_state


def dmd_step_from_config(
    config: ml_collections.ConfigDict, nd: NetworkDef, teacher_apply_fn: ApplyFn | None, *,
    mesh: Mesh | None = None, tx: optax.GradientTransformation | None = None,
    schedule: Any = None,
) -> StepFn:  # fmt: skip
    """The (unjitted) DMD / rCM step of ``config`` (``make_dmd_train_step`` with its options);
    arguments as ``scm_jax.train.aot.train_step_from_config``."""
    validate_dmd_config(config)
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
    )  # fmt: skip
