"""sCD, DMD and rCM on a Gaussian mixture through the real training steps.

:func:`fit_distill` runs ``scm_jax.train.step`` (sCD) or ``scm_jax.train.step_dmd`` (DMD, rCM:
generator + fake-score critic, two optimisers, k critic updates per generator update) on data drawn
from a ``GaussianMixture`` inside a jitted ``lax.scan``, with the exact mixture teacher (or any
``ApplyFn``). The three objectives thus differ only in their step, and compare at an equal number
of generator updates. Like ``scm_jax.toy.fit`` it is the small loop for closed-form problems, not
the training system (no configs, checkpoints or sharding).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import objectives
from scm_jax.gmm import GaussianMixture
from scm_jax.guidance import ApplyFn
from scm_jax.networks import NetworkDef
from scm_jax.optim import make_optimizer
from scm_jax.run.state import init_state
from scm_jax.toy.fit import FitResult, concat_history
from scm_jax.train.step import make_train_step
from scm_jax.train.step_dmd import DMDOptions, init_dmd_state, make_dmd_train_step

Array = jax.Array
OBJECTIVES = objectives.names_where(lambda o: o.needs_teacher)  # the distilling objectives


def fit_distill(
    objective: str,
    nd: NetworkDef,
    gmm: GaussianMixture,
    key: Array,
    *,
    teacher_apply_fn: ApplyFn,
    init_net: Any = None,
    sigma_d: float = 0.5,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    critic_lr: float | None = None,
    P_mean: float = -1.0,
    P_std: float = 1.6,
    warmup_steps: int = 0,
    ema_halflife_steps: float = 50.0,
    dmd: dict[str, Any] | None = None,
    loss_options: dict[str, Any] | None = None,
    adaptive_weighting: bool = True,
    chunk: int = 100,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Distil the mixture's teacher into ``nd`` with sCD, DMD or rCM.

    Args:
      objective: ``'scd'``, ``'dmd'`` or ``'rcm'``.
      nd: the (unconditional) student; the critic has the same architecture.
      gmm: the data (rCM's and sCD's x0); key: PRNG key.
      teacher_apply_fn: the teacher (``scm_jax.gmm.teacher_apply_fn``), no parameters.
      init_net: network parameters both the student and the critic start from (e.g. a diffusion
        model fitted with ``toy.fit``); None: fresh.
      sigma_d, P_mean, P_std: data std and the sCD proposal (rCM's sCD term).
      steps, batch_size, lr: generator updates, batch, Adam (0.9, 0.99) constant rate.
      critic_lr: the critic's rate (default ``lr``).
      warmup_steps: the tangent warm-up H (sCD, rCM).
      ema_halflife_steps: EMA half-life in generator updates.
      dmd: :class:`~scm_jax.train.step_dmd.DMDOptions` fields (critic_updates, weight, ...).
      loss_options: sCD options (``warmup_form``, ``tangent_norm``, ...).
      adaptive_weighting: the sCD term's learned w_phi.
      chunk: steps per jitted ``lax.scan`` call; log: a progress-line callback.
    Returns:
      :class:`~scm_jax.toy.fit.FitResult` (final and EMA ``{'net', 'weight'}`` parameters of the
      student, the loss per step, the wall time, and in ``history`` the step's other scalar
      metrics per step: ``grad_norm``, ``learning_rate``, ..., DMD's ``critic_loss``).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    chunk = max(1, min(chunk, steps))  # a short run is one chunk of exactly ``steps``
    tx, schedule = make_optimizer("adam", lr, batch_size=batch_size, b1=0.9, b2=0.99)
    ema = {"power_std": (), "halflife_kimg": ema_halflife_steps * batch_size / 1000}
    opts = {"warmup_steps": warmup_steps, **(loss_options or {})}
    common = dict(sigma_d=sigma_d, P_mean=P_mean, P_std=P_std, batch_size=batch_size, **ema,
                  loss_options=opts, adaptive_weighting=adaptive_weighting)  # fmt: skip
    k_init, k_data = jax.random.split(key)
    if not objectives.get(objective).critic:  # sCD: the sCM step
        step_fn = make_train_step(nd, tx, schedule, objective=objective,
                                  teacher_apply_fn=teacher_apply_fn, **common)  # fmt: skip
        state = init_state(nd, tx, k_init, **ema, init_net=init_net)
    else:
        options = DMDOptions(**(dmd or {}))
        k = options.critic_updates
        critic_tx, _ = make_optimizer("adam", critic_lr or lr, batch_size=batch_size / k, b1=0.9,
                                      b2=0.99)  # fmt: skip
        step_fn = make_dmd_train_step(nd, tx, schedule, critic_tx, objective=objective,
                                      options=options, teacher_apply_fn=teacher_apply_fn,
                                      **common)  # fmt: skip
        state = init_dmd_state(nd, tx, critic_tx, k_init, **ema, init_net=init_net)

    def one_step(state, step):
        x0 = gmm.sample(jax.random.fold_in(k_data, step), batch_size)
        state, values = step_fn(state, x0, None, None)
        return state, {k: v for k, v in values.items() if jnp.ndim(v) == 0}

    @jax.jit
    def run_chunk(state, start):
        return jax.lax.scan(one_step, state, start + jnp.arange(chunk))

    chunks = []
    t0 = time.time()
    for start in range(0, steps, chunk):
        state, values = run_chunk(state, start)
        chunks.append(values)
        if log is not None:
            loss = float(values["loss"].mean())
            log(f"{objective} step {start + chunk}/{steps}: loss {loss:.4f} "
                f"({time.time() - t0:.1f} s)")  # fmt: skip
    jax.block_until_ready(state)
    ema_params = {**state.params, "net": next(iter(state.emas.values()))}
    history = concat_history(chunks)
    losses = history.pop("loss")
    return FitResult(state.params, ema_params, losses, time.time() - t0, history)
