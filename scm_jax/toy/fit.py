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

from scm_jax import objectives, trigflow
from scm_jax.gmm import GaussianMixture
from scm_jax.guidance import ApplyFn
from scm_jax.networks import NetworkDef, project_weights

Array = jax.Array
OBJECTIVES = objectives.names_where(lambda o: not o.critic)  # the sCM step's objectives


@dataclasses.dataclass
class FitResult:
    """Outcome of :func:`fit`: final and EMA parameters, the loss every step, wall time, and
    ``history``: per-step ``(steps,)`` diagnostics named as the training step's metrics
    (``grad_norm``; for consistency objectives ``tangent_norm`` (mean raw ||g||),
    ``tangent_norm_max``, ``nonfinite`` (fraction of samples), ``mse``, ``w_mean``)."""

    params: dict[str, Any]
    ema_params: dict[str, Any]
    losses: Array
    seconds: float
    history: dict[str, Array] = dataclasses.field(default_factory=dict)


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
    adaptive_weighting: bool = True,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train ``nd`` on samples of ``gmm`` with one of the objectives.

    Args:
      objective: ``'diffusion'``, ``'sct'`` or ``'scd'`` (needs ``teacher_apply_fn``, e.g. the
        exact mixture teacher ``scm_jax.gmm.teacher_apply_fn``).
      nd: the network (``scm_jax.networks.build_network``), unconditional.
      gmm: the data distribution; key: PRNG key.
      sigma_d, P_mean, P_std: TrigFlow data std and the time proposal.
      steps, batch_size, lr: Adam (b1 0.9, b2 0.99) steps, batch and constant learning rate.
      warmup_steps: tangent warm-up H; ema_halflife_steps: EMA half-life in steps.
      params: initial parameters (default ``nd.init``).
      chunk: steps per jitted ``lax.scan`` call (``steps`` is rounded up to a multiple; at most
        ``steps``).
      loss_options: extra keyword options of the consistency loss (tangent_norm, ...).
      adaptive_weighting: learn w_phi(t) (False: the fixed prior weight, no w_phi).
      log: called with a progress line after every chunk (e.g. ``print``).
    Returns:
      A :class:`FitResult`; ``losses`` and each ``history`` entry are ``(steps,)``. Steps are
      not skipped when the loss or gradient is not finite (the training system's step does).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    entry = objectives.get(objective)
    if entry.needs_teacher and teacher_apply_fn is None:
        raise ValueError(f"{entry.label} needs a teacher: pass teacher_apply_fn (e.g. the exact "
                         "mixture's)")  # fmt: skip
    chunk = max(1, min(chunk, steps))  # a short run is one chunk of exactly ``steps``
    k_init, k_train = jax.random.split(key)
    params = nd.init(k_init) if params is None else params
    tx = optax.adam(lr, b1=0.9, b2=0.99)
    opt_state = tx.init(params)
    ema_decay = 0.5 ** (1.0 / ema_halflife_steps)
    opts = dict(loss_options or {})
    weight_fn = nd.weight_fn if adaptive_weighting else None

    def loss_fn(p: dict[str, Any], step: Array, k: Array) -> tuple[Array, dict[str, Array]]:
        k_x, k_z, k_t = jax.random.split(k, 3)
        x0 = gmm.sample(k_x, batch_size)
        z = trigflow.sample_noise(k_z, x0.shape, sigma_d)
        t = trigflow.sample_t_lognormal(k_t, (batch_size,), P_mean, P_std, sigma_d)
        common = dict(sigma_d=sigma_d)
        if not entry.scm_term:  # the table's loss: diffusion_loss
            return entry.loss(nd.apply_fn, weight_fn, p, x0, z, t, **common)
        cm = dict(common, step=step, warmup_steps=warmup_steps, **opts)
        if not entry.tangent_from_teacher:  # sct_loss
            return entry.loss(nd.apply_fn, weight_fn, p, x0, z, t, **cm)
        return entry.loss(nd.apply_fn, weight_fn, p, teacher_apply_fn, None, x0, z, t, **cm)

    def one_step(carry, step):
        p, ema, opt = carry
        k = jax.random.fold_in(k_train, step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, step, k)
        updates, opt = tx.update(grads, opt, p)
        p = project_weights(optax.apply_updates(p, updates))
        ema = jax.tree.map(lambda e, q: ema_decay * e + (1 - ema_decay) * q, ema, p)
        values = {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads)}
        if entry.consistency:
            values.update(
                tangent_norm=aux["g_norm_mean"], tangent_norm_max=aux["g_norm_max"],
                nonfinite=aux["nonfinite_fraction"], mse=aux["mse"], w_mean=aux["w_mean"],
            )  # fmt: skip
        return (p, ema, opt), values

    @jax.jit
    def run_chunk(carry, start):
        return jax.lax.scan(one_step, carry, start + jnp.arange(chunk))

    carry = (params, params, opt_state)
    chunks = []
    t0 = time.time()
    for start in range(0, steps, chunk):
        carry, values = run_chunk(carry, start)
        chunks.append(values)
        if log is not None:
            loss = float(values["loss"].mean())
            log(f"{objective} step {start + chunk}/{steps}: loss {loss:.4f} "
                f"({time.time() - t0:.1f} s)")  # fmt: skip
    jax.block_until_ready(carry)
    history = concat_history(chunks)
    losses = history.pop("loss")
    return FitResult(carry[0], carry[1], losses, time.time() - t0, history)


def concat_history(chunks: list[dict[str, Array]]) -> dict[str, Array]:
    """Per-chunk ``{name: (chunk,)}`` scalars -> ``{name: (steps,)}``."""
    return {k: jnp.concatenate([c[k] for c in chunks]) for k in chunks[0]}
