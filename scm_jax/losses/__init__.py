"""The objectives: TrigFlow diffusion (teacher), sCT and sCD, DMD and the student rollouts of
DMD / rCM. Pure functions of arrays and callables (``ApplyFn``, see ``scm_jax.guidance``); none
of them reads a config."""

from scm_jax.losses.common import (
    TANGENT_NORMS,
    WARMUP_FORMS,
    normalize_tangent,
    proposal_time_edges,
    tangent_warmup,
    weighted_loss,
)
from scm_jax.losses.consistency import (
    consistency_loss,
    consistency_target,
    scd_loss,
    sct_loss,
    tangent_jvp,
    teacher_velocity,
)
from scm_jax.losses.diffusion import diffusion_loss
from scm_jax.losses.dmd import dmd_direction, dmd_generator_loss, dmd_loss, regression_loss
from scm_jax.losses.rollout import (
    fixed_rollout_times,
    random_rollout_times,
    sample_num_steps,
    student_rollout,
)

__all__ = [
    "TANGENT_NORMS",
    "WARMUP_FORMS",
    "consistency_loss",
    "consistency_target",
    "diffusion_loss",
    "dmd_direction",
    "dmd_generator_loss",
    "dmd_loss",
    "fixed_rollout_times",
    "normalize_tangent",
    "proposal_time_edges",
    "random_rollout_times",
    "regression_loss",
    "sample_num_steps",
    "scd_loss",
    "sct_loss",
    "student_rollout",
    "tangent_jvp",
    "tangent_warmup",
    "teacher_velocity",
    "weighted_loss",
]
