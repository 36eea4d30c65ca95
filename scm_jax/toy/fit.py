"""A compact, jitted training routine for toy problems (tests, notebooks, benchmarks).

It runs the real objectives (``scm_jax.losses``) with Adam, the forced weight-normalisation
projection after every update and an EMA of the parameters, on data drawn from a
``GaussianMixture`` inside the jitted step. It is not the training system (configs,
checkpoints, sharding and logging come with ``scm-jax train``); it is the small loop for problems
whose answer is known in closed form.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from scm_jax import trigflow
from scm_jax.guidance import ApplyFn
from scm_jax.losses import diffusion_loss, scd_loss, sct_loss
from scm_jax.networks import NetworkDef, project_weights
from scm_jax.toy.gmm import GaussianMixture

Array = jax.Array
OBJECTIVES = ("diffusion", "sct", "scd")


@dataclasses.dataclass
class FitResult:
    """Outcome of :func:`fit`: final and EMA parameters, the loss every step, wall time."""

    params: dict[str, Any]
    ema_params: dict[str, Any]
    losses: Array
    seconds: float


def fit(
    objective: str,
    nd: NetworkDef,
    gmm: GaussianMixture,
    key: Array,
    *,
    sigma_d: float = 0.5,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 1e-3,
    P_mean: float = -1.0,
    P_std: float = 1.6,
    warmup_steps: int = 500,
    ema_halflife_steps: float = 100.0,
    teacher_apply_fn: ApplyFn | None = None,
    params: dict[str, Any] | None = None,
    chunk: int = 100,
    loss_options: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train ``nd`` on samples of ``gmm`` with one of the objectives.

    Args:
      objective: ``'diffusion'``, ``'sct'`` or ``'scd'`` (needs ``teacher_apply_fn``, e.g. the
        exact mixture teacher ``scm_jax.toy.gmm.teacher_apply_fn``).
      nd: the network (``scm_jax.networks.build_network``), unconditional.
      gmm: the data distribution; key: PRNG key.
      sigma_d, P_mean, P_std: TrigFlow data std and the time proposal.
      steps, batch_size, lr: Adam (b1 0.9, b2 0.99) steps, batch and constant learning rate.
      warmup_steps: tangent warm-up H; ema_halflife_steps: EMA half-life in steps.
      params: initial parameters (default ``nd.init``).
      chunk: steps per jitted ``lax.scan`` call (``steps`` is rounded up to a multiple).
      loss_options: extra keyword options of the consistency loss (tangent_norm, ...).
      log: called with a progress line after every chunk (e.g. ``print``).
    Returns:
      A :class:`FitResult`; ``losses`` is ``(steps,)``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    if objective == "scd" and teacher_apply_fn is None:
        raise ValueError("sCD needs a teacher: pass teacher_apply_fn (e.g. the exact mixture's)")
    k_init, k_train = jax.random.split(key)
    params = nd.init(k_init) if params is None else params
    tx = optax.adam(lr, b1=0.9, b2=0.99)
    opt_state = tx.init(params)
    ema_decay = 0.5 ** (1.0 / ema_halflife_steps)
    opts = dict(loss_options or {})

    def loss_fn(p: dict[str, Any], step: Array, k: Array) -> Array:
        k_x, k_z, k_t = jax.random.split(k, 3)
        x0 = gmm.sample(k_x, batch_size)
        z = trigflow.sample_noise(k_z, x0.shape, sigma_d)
        t = trigflow.sample_t_lognormal(k_t, (batch_size,), P_mean, P_std, sigma_d)
        common = dict(sigma_d=sigma_d)
        if objective == "diffusion":
            return diffusion_loss(nd.apply_fn, nd.weight_fn, p, x0, z, t, **common)[0]
        cm = dict(common, step=step, warmup_steps=warmup_steps, **opts)
        if objective == "sct":
            return sct_loss(nd.apply_fn, nd.weight_fn, p, x0, z, t, **cm)[0]
        return scd_loss(nd.apply_fn, nd.weight_fn, p, teacher_apply_fn, None, x0, z, t, **cm)[0]

    def one_step(carry, step):
        p, ema, opt = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, step, jax.random.fold_in(k_train, step))
        updates, opt = tx.update(grads, opt, p)
        p = project_weights(optax.apply_updates(p, updates))
        ema = jax.tree.map(lambda e, q: ema_decay * e + (1 - ema_decay) * q, ema, p)
        return (p, ema, opt), loss

    @jax.jit
    def run_chunk(carry, start):
        return jax.lax.scan(one_step, carry, start + jnp.arange(chunk))

    carry = (params, params, opt_state)
    losses = []
    t0 = time.time()
    for start in range(0, steps, chunk):
        carry, chunk_losses = run_chunk(carry, start)
        losses.append(chunk_losses)
        if log is not None:
            log(f"{objective} step {start + chunk}/{steps}: loss {float(chunk_losses.mean()):.4f} "
                f"({time.time() - t0:.1f} s)")  # fmt: skip
    jax.block_until_ready(carry)
    return FitResult(carry[0], carry[1], jnp.concatenate(losses), time.time() - t0)
