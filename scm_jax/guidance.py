"""The calling convention shared by objectives and samplers, and classifier-free guidance.

Every network, teacher or analytic model is used through an ``ApplyFn``::

    apply_fn(params, x_scaled, t, labels=None, guidance=None, key=None) -> F

``x_scaled`` is x_t / sigma_d ``(B, ...)``, ``t`` is ``(B,)``, ``labels`` int ``(B,)`` with -1 for
the null label (or float ``(B, K)``), ``guidance`` a ``(B,)`` scale for networks with a guidance
input, and ``key`` a dropout PRNG key: ``None`` means evaluation mode. ``F`` has the shape of
``x_scaled``. ``scm_jax.networks.NetworkDef.apply_fn`` builds one from a Flax module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
ApplyFn = Callable[..., Array]


def null_labels(labels: Array) -> Array:
    """The null (unconditional) label batch matching ``labels``: -1 for ints, zeros for one-hot."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return jnp.full_like(labels, -1)
    return jnp.zeros_like(labels)


def guided_F(
    apply_fn: ApplyFn,
    params: Any,
    x_scaled: Array,
    t: Array,
    labels: Array,
    scale: Array | float,
    key: Array | None = None,
) -> Array:
    """Classifier-free guidance: F(x, t, null) + s (F(x, t, y) - F(x, t, null)).

    One call on a doubled batch (conditional and unconditional halves share the dropout key).
    s = 1 gives the conditional model, s = 0 the unconditional one.

    Args:
      apply_fn, params: the (teacher) network, see the module docstring.
      x_scaled: x_t / sigma_d, ``(B, ...)``.
      t: ``(B,)`` times.
      labels: int ``(B,)`` (or one-hot ``(B, K)``); guidance needs labels.
      scale: scalar or ``(B,)`` guidance scales.
      key: dropout key or None.
    Returns:
      Guided F, shape of ``x_scaled``.
    """
    b = x_scaled.shape[0]
    scale = jnp.broadcast_to(jnp.asarray(scale, x_scaled.dtype), (b,))
    F = apply_fn(
        params,
        jnp.concatenate([x_scaled, x_scaled]),
        jnp.concatenate([t, t]),
        jnp.concatenate([labels, null_labels(labels)]),
        None,
        key,
    )
    F_cond, F_uncond = F[:b], F[b:]
    s = scale.reshape((b,) + (1,) * (x_scaled.ndim - 1))
    return F_uncond + s * (F_cond - F_uncond)


def sample_guidance_scale(
    key: Array, batch: int, s_min: float, s_max: float, dtype=jnp.float32
) -> Array:
    """Per-sample guidance scales s ~ U[s_min, s_max] ``(batch,)`` (sCD with a CFG teacher)."""
    if not s_min <= s_max:
        raise ValueError(f"guidance range must satisfy s_min <= s_max, got [{s_min}, {s_max}]")
    return jax.random.uniform(key, (batch,), dtype, s_min, s_max)
