"""FID feature statistics streamed on the accelerator: running sums, updated per batch.

  stats = init(2048, mesh=mesh)                          # replicated accumulators
  for images, mask in batches:                           # one batch shape; mask marks real rows
      stats = update(stats, inception_features(params, images), mask)
  mu, sigma, n = finalize(stats)                         # float64 on the host

``update`` subtracts a fixed shift (the first non-empty batch's mean) before summing x and x x^T,
so float32 sums hold the spread of the features, not their offset: naive float32 sums of x x^T
lose about log10(|mean|^2 / var) digits in ``S2 - n mu mu^T``. The distance and the statistics
files are ``scm_jax.eval.fid``.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Array = jax.Array

__all__ = ["FeatureStats", "finalize", "init", "update"]


@flax.struct.dataclass
class FeatureStats:
    """Running sums of shifted features: replicated on the mesh, a pytree for ``jit``."""

    count: Array  # () int32: rows counted
    shift: Array  # (D,) the first non-empty batch's mean (fixed afterwards)
    sum: Array  # (D,) sum of (x - shift)
    sum_outer: Array  # (D, D) sum of (x - shift)(x - shift)^T

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return self.shift.shape[0]


def init(dim: int, dtype: Any = None, mesh: Mesh | None = None) -> FeatureStats:
    """Empty statistics for ``dim``-d features.

    Args:
      dim: feature dimension D (2048 for Inception pool3).
      dtype: accumulator dtype; default float64 when ``jax_enable_x64`` is on, else float32.
      mesh: when given, the accumulators are replicated over it (``PartitionSpec()``).
    Returns:
      ``FeatureStats`` with count 0 and zero ``(D,)``, ``(D,)``, ``(D, D)`` arrays.
    """
    if dim < 1:
        raise ValueError(f"feature dimension must be >= 1, got {dim}")
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
    stats = FeatureStats(
        count=jnp.zeros((), jnp.int32),
        shift=jnp.zeros((dim,), dtype),
        sum=jnp.zeros((dim,), dtype),
        sum_outer=jnp.zeros((dim, dim), dtype),
    )
    if mesh is not None:
        stats = jax.device_put(stats, NamedSharding(mesh, PartitionSpec()))
    return stats


@jax.jit
def update(stats: FeatureStats, features: Array, mask: Array | None = None) -> FeatureStats:
    """Add a batch of features (the rows where ``mask`` is true) to the statistics.

    Jitted; call it with one fixed batch shape (pad the last batch and mask the padding) to
    compile once. With ``features`` sharded along the batch over a mesh the sums become
    cross-device reductions and the returned statistics stay replicated. Padded rows may hold
    anything (NaN included): they are selected away, not multiplied by 0.

    Args:
      stats: from ``init`` or a previous ``update``.
      features: ``(B, D)`` any float dtype (cast to the accumulator dtype).
      mask: ``(B,)`` bool (or 0/1) rows to count; default all.
    Returns:
      The updated ``FeatureStats``.
    """
    if features.ndim != 2 or features.shape[1] != stats.dim:
        raise ValueError(
            f"expected features (B, {stats.dim}) for statistics of {stats.dim}-d features, "
            f"got shape {features.shape}"
        )
    dtype = stats.sum.dtype
    x = features.astype(dtype)
    if mask is None:
        keep = jnp.ones(x.shape[:1], bool)
    else:
        if mask.shape != x.shape[:1]:
            raise ValueError(f"mask shape {mask.shape} does not match {x.shape[0]} rows")
        keep = mask.astype(bool)
    n = keep.sum(dtype=jnp.int32)
    batch_mean = jnp.where(keep[:, None], x, 0).sum(0) / jnp.maximum(n, 1).astype(dtype)
    shift = jnp.where(stats.count == 0, batch_mean, stats.shift)
    y = jnp.where(keep[:, None], x - shift, 0)
    outer = jnp.einsum("bi,bj->ij", y, y, precision=jax.lax.Precision.HIGHEST)
    return FeatureStats(
        count=stats.count + n,
        shift=shift,
        sum=stats.sum + y.sum(0),
        sum_outer=stats.sum_outer + outer,
    )


def finalize(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and unbiased covariance (float64, on the host) of the features counted.

    Returns:
      ``(mu (D,) float64, sigma (D, D) float64 symmetric, n)``.
    Raises:
      ValueError: fewer than 2 rows, or non-finite sums (a non-finite feature was counted).
    """
    n = int(jax.device_get(stats.count))
    if n < 2:
        raise ValueError(f"FID statistics need at least 2 feature rows, got {n}")
    shift, s1, s2 = (
        np.asarray(jax.device_get(a), np.float64) for a in (stats.shift, stats.sum, stats.sum_outer)
    )
    if not (np.isfinite(s1).all() and np.isfinite(s2).all() and np.isfinite(shift).all()):
        raise ValueError(f"non-finite feature statistics after {n} rows: NaN/inf features counted")
    m = s1 / n
    sigma = (s2 - n * np.outer(m, m)) / (n - 1)
    return shift + m, (sigma + sigma.T) / 2, n
