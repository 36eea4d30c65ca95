"""The objectives: TrigFlow diffusion (teacher), sCT and sCD. Pure functions of arrays and
callables (``ApplyFn``, see ``scm_jax.guidance``); none of them reads a config."""

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

__all__ = [
    "TANGENT_NORMS",
    "WARMUP_FORMS",
    "consistency_loss",
    "consistency_target",
    "diffusion_loss",
    "normalize_tangent",
    "proposal_time_edges",
    "scd_loss",
    "sct_loss",
    "tangent_jvp",
    "tangent_warmup",
    "teacher_velocity",
    "weighted_loss",
]
