"""Toy problems with closed-form answers: Gaussian-mixture data and its exact TrigFlow teacher.

``gmm`` holds the data (:class:`GaussianMixture`), the exact posterior, velocity and score of the
noised mixture, the exact teacher ``ApplyFn`` and the exact PF-ODE flow map; ``metrics`` compares
sample sets (sliced Wasserstein-2, RBF MMD^2) and measures mode coverage and precision.
"""

from scm_jax.gmm import (
    GaussianMixture,
    combine,
    conditional_teacher_apply_fn,
    flow_map,
    grid_mixture,
    log_prob,
    posterior_x0,
    posterior_z,
    ring_mixture,
    score,
    teacher_apply_fn,
    velocity,
)
from scm_jax.toy.metrics import mmd_rbf, mode_statistics, sliced_wasserstein

__all__ = [
    "GaussianMixture",
    "combine",
    "conditional_teacher_apply_fn",
    "flow_map",
    "grid_mixture",
    "log_prob",
    "mmd_rbf",
    "mode_statistics",
    "posterior_x0",
    "posterior_z",
    "ring_mixture",
    "score",
    "sliced_wasserstein",
    "teacher_apply_fn",
    "velocity",
]
