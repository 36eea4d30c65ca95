"""Pieces shared by the objectives: adaptive weighting, tangent normalisation and warm-up,
per-time-bin diagnostics and input checks. Pure functions of arrays.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import trigflow

Array = jax.Array

TANGENT_NORMS = ("l2", "rms", "clip", "none")
WARMUP_FORMS = ("scm", "rcm")


def per_sample_sum(x: Array) -> Array:
    """Sum over all axes but the first, in at least float32: ``(B, ...)`` -> ``(B,)``."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def expand(t: Array, x: Array) -> Array:
    """Reshape ``(B,)`` so that it broadcasts against ``x`` of shape ``(B, ...)``."""
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def weighted_loss(sq_err: Array, w: Array | None, D: int) -> Array:
    """Per-sample loss with learned adaptive weighting (EDM2 Eq. 21 / sCM Eq. 8).

    (e^{w} / D) * sq_err - w, or sq_err / D when ``w`` is None (fixed prior weight, the ablation).

    Args:
      sq_err: ``(B,)`` squared L2 error summed over the D elements of a sample.
      w: ``(B,)`` log-weights w_phi(t), or None.
      D: elements per sample.
    Returns:
      ``(B,)`` losses (float32 at least).
    """
    sq_err = sq_err.astype(jnp.promote_types(sq_err.dtype, jnp.float32))
    if w is None:
        return sq_err / D
    return jnp.exp(w) / D * sq_err - w


def normalize_tangent(g: Array, mode: str = "l2", c: float = 0.1) -> Array:
    """Tangent normalisation of the consistency target (sCM §4.2).

    ``'l2'``: g / (||g|| + c) with the L2 norm over all elements of a sample (the paper's formula);
    ``'rms'``: g / (||g|| / sqrt(D) + c) (FastGen's spatially invariant variant);
    ``'clip'``: g clipped to [-1, 1] elementwise (the paper's alternative); ``'none'``: g.

    Args:
      g: ``(B, ...)`` target.
      mode: one of ``TANGENT_NORMS``.
      c: the constant, 0.1 in all paper experiments.
    """
    if mode == "none":
        return g
    if mode == "clip":
        return jnp.clip(g, -1.0, 1.0)
    if mode not in ("l2", "rms"):
        raise ValueError(f"unknown tangent normalisation {mode!r}; expected one of {TANGENT_NORMS}")
    norm = jnp.sqrt(per_sample_sum(g * g))
    if mode == "rms":
        norm = norm / math.sqrt(math.prod(g.shape[1:]))
    return g / (expand(norm, g) + c)


def tangent_warmup(step: Array | int, warmup_steps: int) -> Array:
    """Warm-up coefficient r = min(1, step / H) (sCM §4.2); H = 0 switches warm-up off (r = 1)."""
    if warmup_steps <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def time_bin_means(values: Array, t: Array, edges: tuple[float, ...] | None = None) -> Array:
    """Mean of ``values`` ``(B,)`` in time bins: ``(num_bins,)`` (0 for an empty bin).

    ``edges`` are the inner bin boundaries in t (for example quartiles of the time proposal,
    :func:`proposal_time_edges`); None uses the batch's own quartiles.
    """
    if edges is None:
        edges_arr = jnp.quantile(t, jnp.array([0.25, 0.5, 0.75], t.dtype))
    else:
        edges_arr = jnp.asarray(edges, t.dtype)
    bins = jnp.searchsorted(edges_arr, t, side="right")
    onehot = jax.nn.one_hot(bins, edges_arr.shape[0] + 1, dtype=values.dtype)
    counts = onehot.sum(axis=0)
    return (onehot * values[:, None]).sum(axis=0) / jnp.maximum(counts, 1)


def proposal_time_edges(
    P_mean: float, P_std: float, sigma_d: float, num_bins: int = 4
) -> tuple[float, ...]:
    """Inner edges splitting the log-normal time proposal into equally likely bins."""
    q = np.arange(1, num_bins) / num_bins
    return tuple(float(v) for v in trigflow.lognormal_t_quantile(q, P_mean, P_std, sigma_d))


def _is_concrete(x: Array) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_batch(x0: Array, t: Array, z: Array | None = None, labels: Array | None = None) -> None:
    """Raise ValueError on mismatched shapes, or on times outside (0, pi/2] when they are concrete.

    Shapes are checked at trace time. Inside ``jax.jit`` times are tracers and their values cannot
    be checked; the training step draws them from the proposal, which lies in (0, pi/2).
    """
    b = x0.shape[0]
    if z is not None and z.shape != x0.shape:
        raise ValueError(f"x0 and z must have the same shape, got {x0.shape} and {z.shape}")
    if t.shape != (b,):
        raise ValueError(f"t must have shape ({b},) to match x0 {x0.shape}, got {t.shape}")
    if labels is not None and labels.shape[0] != b:
        raise ValueError(f"labels must have batch size {b} to match x0, got shape {labels.shape}")
    if _is_concrete(t):
        tn = np.asarray(t)
        bad = tn[~((tn > 0) & (tn <= math.pi / 2))]
        if bad.size:
            raise ValueError(f"times must lie in (0, pi/2]; got {bad[:4].tolist()}")
