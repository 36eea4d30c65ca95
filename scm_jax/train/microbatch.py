"""Gradient accumulation over micro-batches for the sCM / diffusion step (``train.micro_batches``).

A batch of B is processed as k micro-batches of B / k inside one jitted step (a ``lax.scan``):
micro-batch j takes block j of every device's rows, so nothing moves between devices; the
gradients, the loss and the diagnostics are merged weighted by each micro-batch's kept
samples, so that the result equals one pass over the batch up to float rounding (the tangent
norms' mean and spread by Chan et al.'s parallel update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

Array = jax.Array


def _bin_counts(t: Array, edges: Any, num_bins: int) -> Array:
    """Samples per time bin ``(num_bins,)``, binned as ``losses.common.time_bin_means`` does."""
    bins = jnp.searchsorted(jnp.asarray(edges, t.dtype), t, side="right")
    return jax.nn.one_hot(bins, num_bins, dtype=jnp.float32).sum(axis=0)


def _split(a: Array, k: int, shards: int, batch_sharding: NamedSharding | None) -> Array:
    """``(B, ...)`` -> ``(k, B / k, ...)``, micro-batch j = block j of every shard's rows."""
    a = a.reshape((shards, k, -1, *a.shape[1:]))
    a = jnp.swapaxes(a, 0, 1).reshape((k, -1, *a.shape[3:]))
    if batch_sharding is None:
        return a
    spec = PartitionSpec(None, *batch_sharding.spec)
    return jax.lax.with_sharding_constraint(a, NamedSharding(batch_sharding.mesh, spec))


def accumulate_micro_batches(
    loss_fn: Callable[..., Any], params: Any, batch: dict[str, Array], k_drop: Array,
    teacher_params: Any, step: Array, *, k: int, shards: int,
    batch_sharding: NamedSharding | None, time_edges: tuple[float, ...] | None, cm: bool,
    mask_nonfinite: bool,
) -> tuple[tuple[Array, dict[str, Array]], Any]:  # fmt: skip
    """``((loss, aux), grads)`` of the whole batch from ``k`` micro-batches (module docstring).

    ``loss_fn(params, micro_batch, k_drop, teacher_params, step, edges) -> (loss, aux)`` is the
    step's loss; every micro-batch is weighted by its kept samples so that the result equals one
    pass over the batch up to float rounding; ``cm``: a consistency objective (tangent-norm and
    non-finite statistics are merged too); ``mask_nonfinite``: the loss drops non-finite samples.
    """
    edges = time_edges
    if edges is None:  # the whole batch's quartiles, as time_bin_means would take them
        t = batch["t"]
        edges = jnp.quantile(t, jnp.array([0.25, 0.5, 0.75], t.dtype))
    num_bins = len(edges) + 1

    def body(acc, mb):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, mb, k_drop, teacher_params, step, edges
        )
        n = jnp.float32(mb["t"].shape[0])
        n_fin = jnp.round((1.0 - aux["nonfinite_fraction"]) * n) if cm else n
        n_keep = n_fin if cm and mask_nonfinite else n  # the loss's denominator
        counts = _bin_counts(mb["t"], edges, num_bins)
        out = {
            "grads": jax.tree.map(lambda s, g: s + n_keep * g, acc["grads"], grads),
            "n_keep": acc["n_keep"] + n_keep,
            "loss": acc["loss"] + n_keep * loss,
            "mse": acc["mse"] + n_keep * aux["mse"],
            "w_mean": acc["w_mean"] + n * aux["w_mean"],
            "bin_totals": acc["bin_totals"] + counts * aux["loss_per_time_bin"],
            "bin_counts": acc["bin_counts"] + counts,
        }
        if cm:  # tangent norms of finite samples: count, mean, M2 (Chan et al.), max
            n_a, mean_a = acc["g_n"], acc["g_mean"]
            n_ab = n_a + n_fin
            delta = aux["g_norm_mean"] - mean_a
            frac = n_fin / jnp.maximum(n_ab, 1.0)
            m2_b = aux["g_norm_std"] ** 2 * n_fin
            out.update(
                g_n=n_ab,
                g_mean=mean_a + delta * frac,
                g_m2=acc["g_m2"] + m2_b + delta**2 * n_a * frac,
                g_max=jnp.maximum(acc["g_max"], aux["g_norm_max"]),
                nonfinite=acc["nonfinite"] + n * aux["nonfinite_fraction"],
                r=aux["r"],
            )
        return jax.tree.map(lambda new, old: new.astype(old.dtype), out, acc), None

    zero = jnp.float32(0.0)
    init = {
        "grads": jax.tree.map(
            lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params
        ),
        "n_keep": zero, "loss": zero, "mse": zero, "w_mean": zero,
        "bin_totals": jnp.zeros((num_bins,), jnp.float32),
        "bin_counts": jnp.zeros((num_bins,), jnp.float32),
    }  # fmt: skip
    if cm:
        init.update(g_n=zero, g_mean=zero, g_m2=zero, g_max=zero, nonfinite=zero, r=zero)
    xs = {name: _split(a, k, shards, batch_sharding) for name, a in batch.items() if a is not None}
    acc, _ = jax.lax.scan(body, init, xs)
    b = jnp.float32(batch["t"].shape[0])
    denom = jnp.maximum(acc["n_keep"], 1.0)
    grads = jax.tree.map(lambda s, p: (s / denom).astype(p.dtype), acc["grads"], params)
    aux = {
        "mse": acc["mse"] / denom,
        "w_mean": acc["w_mean"] / b,
        "loss_per_time_bin": acc["bin_totals"] / jnp.maximum(acc["bin_counts"], 1.0),
    }
    if cm:
        aux.update(
            g_norm_mean=acc["g_mean"],
            g_norm_std=jnp.sqrt(acc["g_m2"] / jnp.maximum(acc["g_n"], 1.0)),
            g_norm_max=acc["g_max"],
            nonfinite_fraction=acc["nonfinite"] / b,
            r=acc["r"],
        )
    return (acc["loss"] / denom, aux), grads
