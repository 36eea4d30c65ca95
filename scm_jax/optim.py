"""Optimisers and the learning-rate schedule, with every duration counted in images.

EDM2's schedule (used by sCM on ImageNet, reference §5): lr(n) = lr_ref / sqrt(max(n / n_ref, 1)),
optionally times a linear ramp-up min(n / n_rampup, 1), where n is the number of images seen
before the step. sCM's CIFAR-10 runs use a constant rate (n_ref = 0).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax

# Optimiser name -> number of float32 moment trees it keeps (used for memory planning).
OPTIMIZER_MOMENTS = {"adam": 2, "radam": 2}


def learning_rate(
    nimg: jnp.ndarray | float, lr: float, lr_ref_nimg: float = 0.0, lr_rampup_nimg: float = 0.0
) -> jnp.ndarray:
    """EDM2 learning rate after ``nimg`` images: inverse-sqrt decay past ``lr_ref_nimg`` and a
    linear ramp-up over ``lr_rampup_nimg`` (0 switches either off)."""
    nimg = jnp.asarray(nimg, jnp.float32)
    out = jnp.asarray(lr, jnp.float32)
    if lr_ref_nimg > 0:
        out = out / jnp.sqrt(jnp.maximum(nimg / lr_ref_nimg, 1.0))
    if lr_rampup_nimg > 0:
        out = out * jnp.minimum(nimg / lr_rampup_nimg, 1.0)
    return out


def make_optimizer(
    name: str,
    lr: float,
    *,
    batch_size: int,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    lr_ref_kimg: float = 0.0,
    lr_rampup_kimg: float = 0.0,
    grad_clip: float = 0.0,
) -> tuple[optax.GradientTransformation, Callable[[jnp.ndarray], jnp.ndarray]]:
    """An optax optimiser and its schedule (step -> learning rate, for logging).

    Args:
      name: ``'adam'`` or ``'radam'`` (sCM's CIFAR-10 consistency models).
      lr: reference learning rate (alpha_ref).
      batch_size: global batch, to turn steps into images.
      b1, b2, eps: Adam moments and epsilon (sCM ImageNet: 0.9, 0.99, 1e-11).
      lr_ref_kimg, lr_rampup_kimg: decay reference and ramp-up length in thousands of images.
      grad_clip: clip the global gradient norm to this value first (0: no clipping).
    Raises:
      ValueError: an unknown optimiser or a non-positive learning rate or batch size.
    """
    if name not in OPTIMIZER_MOMENTS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZER_MOMENTS)}")
    if lr <= 0 or batch_size <= 0:
        raise ValueError(f"lr ({lr}) and batch_size ({batch_size}) must be positive")

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        nimg = jnp.asarray(step, jnp.float32) * batch_size
        return learning_rate(nimg, lr, lr_ref_kimg * 1000, lr_rampup_kimg * 1000)

    if name == "adam":
        core = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    else:
        core = optax.radam(schedule, b1=b1, b2=b2, eps=eps)
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), core) if grad_clip > 0 else core
    return tx, schedule
