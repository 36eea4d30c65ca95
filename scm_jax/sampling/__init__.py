"""Samplers: the multistep consistency sampler (sCM §4) and the teacher's PF-ODE solvers (§1.2).

Pure functions of ``(apply_fn, params, key, ...)`` in the shared ``ApplyFn`` convention
(``scm_jax.guidance``); each is written with ``lax.scan`` so that ``jax.jit`` turns a whole
sampling run into one program with a single trace of the network. Python-level arguments (the
network function, shapes, time schedules, step counts) must be static under ``jax.jit``; the
``make_*`` helpers close over them and return jitted functions of the arrays::

    sample = make_consistency_sampler(net.apply_fn, (B, D), consistency_times(2, t_max), 0.5)
    x0 = sample(params, key, labels)

    sample, nfe = make_ode_sampler(teacher.apply_fn, (B, D), 18, 0.5)  # EDM Heun: nfe = 35
    x0 = sample(params, key, labels, guidance_scale)

    # the PF-ODE endpoint from any (x_t, t), t an array (one compile for every start time):
    x0 = jax.jit(solve_ode_from, static_argnames=ODE_FROM_STATIC)(teacher.apply_fn, params,
                                                                  x_t, t, 64, 0.5)

or, equivalently, ``jax.jit(sample_consistency, static_argnames=CONSISTENCY_STATIC)``.
"""

from scm_jax.sampling.consistency import (
    CONSISTENCY_STATIC,
    consistency_times,
    make_consistency_sampler,
    sample_consistency,
)
from scm_jax.sampling.ode import (
    ODE_FROM_STATIC,
    ODE_STATIC,
    edm_times,
    edm_times_from,
    make_ode_sampler,
    ode_nfe,
    sample_ode,
    solve_ode_from,
)

__all__ = [
    "CONSISTENCY_STATIC",
    "ODE_FROM_STATIC",
    "ODE_STATIC",
    "consistency_times",
    "edm_times",
    "edm_times_from",
    "make_consistency_sampler",
    "make_ode_sampler",
    "ode_nfe",
    "sample_consistency",
    "sample_ode",
    "solve_ode_from",
]
