"""Training metrics: per-step values aggregated over a logging interval with ``clu.metrics``.

One :class:`TrainMetrics` collection serves every objective. Each field is *optional*: a value
that a step does not provide (the tangent statistics of the diffusion objective, say) is stored
as the metric's empty state (count 0) and :func:`summarize` leaves it out, so a diffusion run
reports no tangent metrics at all instead of zeros. Because the pytree structure is the same
whichever values are given, the accumulated metrics can be a ``jax.jit`` / ``lax.scan`` carry.

Fields (all float32):

=====================  =====================  ==================================================
name                   metric                 meaning
=====================  =====================  ==================================================
``loss``               Average                training loss
``mse``                Average                mean squared error per element
``grad_norm``          Average                global gradient norm
``tangent_norm``       Average                mean raw ||g|| of the consistency target
``tangent_norm_std``   Average                its standard deviation within the batch
``tangent_norm_max``   Max                    largest raw ||g|| seen in the interval
``w_mean``             Average                mean adaptive log-weight w(t)
``nonfinite``          Average                fraction of samples with a non-finite target
``nonfinite_steps``    Average                fraction of steps skipped (loss/grads not finite)
``learning_rate``      Last                   the last learning rate
``warmup_r``           Last                   the last tangent warm-up coefficient r
``loss_per_time_bin``  VectorAverage          loss per time bin, ``(K,)``
``dmd_loss``           Average                DMD / rCM: the DMD term ||Delta||^2 (before lambda)
``regression_loss``    Average                DMD: the regression term (when on)
``critic_loss``        Average                DMD / rCM: the fake score's diffusion loss
``critic_grad_norm``   Average                its gradient norm
``critic_skipped``     Average                fraction of critic updates skipped (not finite)
=====================  =====================  ==================================================

Skipped steps: when ``nonfinite_steps`` is given and non-zero for a step, all of that step's
averaged values (which are then typically NaN) are masked out, so one bad step does not poison
the interval's averages; ``learning_rate`` and ``warmup_r`` are still recorded.
"""

# No ``from __future__ import annotations``: clu's Collection reads the metric classes from
# ``cls.__annotations__`` and needs them as classes, not strings.

from collections.abc import Mapping
from typing import Any, ClassVar

import clu.metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NUM_TIME_BINS = 4  # bins of the per-time loss metrics: the one definition (loop, aot, DMD)

# Loss aux names (``scm_jax.losses``) -> metric names.
AUX_TO_METRIC: dict[str, str] = {
    "loss_per_time_bin": "loss_per_time_bin",
    "mse": "mse",
    "w_mean": "w_mean",
    "g_norm_mean": "tangent_norm",
    "g_norm_std": "tangent_norm_std",
    "g_norm_max": "tangent_norm_max",
    "nonfinite_fraction": "nonfinite",
    "r": "warmup_r",
}

# Values kept even for a skipped step.
_ALWAYS_KEPT = ("nonfinite_steps", "learning_rate", "warmup_r", "critic_loss", "critic_grad_norm",
                "critic_skipped")  # fmt: skip


@flax.struct.dataclass
class Max(clu.metrics.Metric):
    """Largest value seen (over all elements of every update); -inf with count 0 when empty."""

    value: Array
    count: Array

    @classmethod
    def empty(cls) -> "Max":
        return cls(value=jnp.array(-jnp.inf, jnp.float32), count=jnp.array(0, jnp.int32))

    @classmethod
    def from_model_output(cls, values: Array, mask: Array | None = None, **_) -> "Max":
        values = jnp.asarray(values, jnp.float32).reshape(-1)
        keep = (
            jnp.ones(values.shape, bool) if mask is None else jnp.broadcast_to(mask, values.shape)
        )
        return cls(
            value=jnp.max(jnp.where(keep, values, -jnp.inf), initial=-jnp.inf),
            count=keep.sum().astype(jnp.int32),
        )

    def merge(self, other: "Max") -> "Max":
        return type(self)(
            value=jnp.maximum(self.value, other.value), count=self.count + other.count
        )

    def compute(self) -> Array:
        return self.value


@flax.struct.dataclass
class Last(clu.metrics.LastValue):
    """``clu.metrics.LastValue`` whose merge keeps the previous value when the newer is empty."""

    def merge(self, other: clu.metrics.LastValue) -> "Last":
        newer = other.count > 0
        return type(self)(
            total=jnp.where(newer, other.total, self.total),
            count=jnp.where(newer, other.count, self.count),
        )


@flax.struct.dataclass
class VectorAverage(clu.metrics.Metric):
    """Per-entry average of a ``(K,)`` vector with per-entry totals and counts.

    An entry with count 0 in an update (an empty bin) adds nothing, so it does not bias the
    average towards 0; :meth:`compute` gives NaN for an entry that stayed empty throughout.
    """

    totals: Array  # (K,) float32: sum of value * count
    counts: Array  # (K,) float32

    size: ClassVar[int] = NUM_TIME_BINS

    @classmethod
    def empty(cls, size: int | None = None) -> "VectorAverage":
        k = cls.size if size is None else size
        return cls(totals=jnp.zeros((k,), jnp.float32), counts=jnp.zeros((k,), jnp.float32))

    @classmethod
    def from_model_output(
        cls, values: Array, counts: Array | None = None, mask: Array | None = None, **_
    ) -> "VectorAverage":
        """``values``: ``(K,)`` per-entry means; ``counts``: ``(K,)`` samples behind each mean.

        Without ``counts`` each finite entry counts once and a non-finite one (NaN for an empty
        bin) counts zero. ``mask``: scalar bool, False drops the whole update.
        """
        values = jnp.asarray(values, jnp.float32)
        if values.ndim != 1:
            raise ValueError(f"VectorAverage expects a (K,) vector, got shape {values.shape}")
        finite = jnp.isfinite(values)
        if counts is None:
            weight = finite.astype(jnp.float32)
        else:
            weight = jnp.where(finite, jnp.asarray(counts, jnp.float32), 0.0)
        if mask is not None:
            weight = weight * jnp.asarray(mask, jnp.float32)
        return cls(totals=jnp.where(weight > 0, values * weight, 0.0), counts=weight)

    def merge(self, other: "VectorAverage") -> "VectorAverage":
        if self.totals.shape != other.totals.shape:
            raise ValueError(
                f"cannot merge time-bin vectors of shapes {self.totals.shape} and "
                f"{other.totals.shape}; pass num_time_bins to make_step_metrics/empty_metrics"
            )
        return type(self)(totals=self.totals + other.totals, counts=self.counts + other.counts)

    def compute(self) -> Array:
        with jax.debug_nans(False):
            return jnp.where(self.counts > 0, self.totals / self.counts, jnp.nan)


@flax.struct.dataclass
class TrainMetrics(clu.metrics.Collection):
    """All training metrics of one logging interval; see the module docstring for the fields."""

    loss: clu.metrics.Average
    mse: clu.metrics.Average
    grad_norm: clu.metrics.Average
    tangent_norm: clu.metrics.Average
    tangent_norm_std: clu.metrics.Average
    tangent_norm_max: Max
    w_mean: clu.metrics.Average
    nonfinite: clu.metrics.Average
    nonfinite_steps: clu.metrics.Average
    learning_rate: Last
    warmup_r: Last
    loss_per_time_bin: VectorAverage
    dmd_loss: clu.metrics.Average
    regression_loss: clu.metrics.Average
    critic_loss: clu.metrics.Average
    critic_grad_norm: clu.metrics.Average
    critic_skipped: clu.metrics.Average


FIELDS: tuple[str, ...] = tuple(k for k in TrainMetrics.__annotations__ if not k.startswith("_"))


def empty_metrics(num_time_bins: int = NUM_TIME_BINS) -> TrainMetrics:
    """An empty :class:`TrainMetrics` (``merge`` with it is a no-op); ``(K,)`` time bins."""
    return TrainMetrics.empty().replace(loss_per_time_bin=VectorAverage.empty(num_time_bins))


def _scalar_average(value: Any, keep: Array) -> clu.metrics.Average:
    v = jnp.asarray(value, jnp.float32).reshape(-1)
    keep_v = jnp.broadcast_to(keep, v.shape)
    return clu.metrics.Average(
        total=jnp.where(keep_v, v, 0.0).sum(), count=keep_v.sum().astype(jnp.int32)
    )


def make_step_metrics(
    *, num_time_bins: int = NUM_TIME_BINS, loss_per_time_bin_count: Any = None, **values: Any
) -> TrainMetrics:
    """Metrics of one training step from whichever values exist; usable inside ``jax.jit``.

    Args:
      num_time_bins: K for an empty ``loss_per_time_bin`` (when that value is not given).
      loss_per_time_bin_count: optional ``(K,)`` number of samples in each time bin; with it an
        empty bin (count 0) is ignored. Without it every finite bin value counts once; note that
        ``losses.common.time_bin_means`` returns 0 (not NaN) for an empty bin, which then counts
        as a 0 -- rare with the proposal's quantile edges and batches of 64+ ((3/4)^64 ~ 1e-8).
      **values: any of :data:`FIELDS`: scalars (float32-castable; an array is averaged over
        its elements) and ``loss_per_time_bin`` ``(K,)``. ``nonfinite_steps`` is 0/1 (or bool):
        1 marks a skipped step and masks its other averaged values.
    Returns:
      A :class:`TrainMetrics` in which missing values are empty (count 0).
    Raises:
      TypeError: for a name that is not a metric.
    """
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown metric name(s) {unknown}; expected some of {FIELDS}")
    metrics = empty_metrics(num_time_bins)
    skipped = values.get("nonfinite_steps")
    ok = jnp.array(True) if skipped is None else jnp.asarray(skipped, jnp.float32) == 0
    fields: dict[str, clu.metrics.Metric] = {}
    for name, value in values.items():
        keep = jnp.array(True) if name in _ALWAYS_KEPT else ok
        if name == "loss_per_time_bin":
            fields[name] = VectorAverage.from_model_output(
                value, counts=loss_per_time_bin_count, mask=keep
            )
        elif name == "tangent_norm_max":
            fields[name] = Max.from_model_output(value, mask=keep)
        elif name in ("learning_rate", "warmup_r"):
            fields[name] = Last(
                total=jnp.mean(jnp.asarray(value, jnp.float32)), count=jnp.array(1, jnp.int32)
            )
        else:
            fields[name] = _scalar_average(value, keep)
    return metrics.replace(**fields)


def metrics_from_aux(loss: Any, aux: Mapping[str, Any], **extra: Any) -> TrainMetrics:
    """:func:`make_step_metrics` from a loss's ``(loss, aux)`` output (names in AUX_TO_METRIC).

    Aux entries without a metric (none today) are ignored; ``extra`` adds values the loss does
    not know, e.g. ``grad_norm``, ``learning_rate``, ``nonfinite_steps``, ``num_time_bins``.
    """
    values = {AUX_TO_METRIC[k]: v for k, v in aux.items() if k in AUX_TO_METRIC}
    return make_step_metrics(loss=loss, **values, **extra)


def summarize(metrics: TrainMetrics) -> dict[str, float]:
    """Host-side flat scalars of the aggregated metrics (copies from device).

    Names are the field names, with ``loss_per_time_bin`` split into ``loss/t_bin0`` ..
    ``loss/t_bin{K-1}``. Metrics (and bins) that received no value are left out.
    """
    host = jax.device_get(metrics)
    out: dict[str, float] = {}
    for name in FIELDS:
        m = getattr(host, name)
        if isinstance(m, VectorAverage):
            counts = np.asarray(m.counts)
            totals = np.asarray(m.totals)
            for i in np.flatnonzero(counts > 0):
                out[f"loss/t_bin{i}"] = float(totals[i] / counts[i])
        elif isinstance(m, Max):
            if int(m.count) > 0:
                out[name] = float(m.value)
        elif int(np.asarray(m.count)) > 0:
            out[name] = float(np.asarray(m.total) / np.asarray(m.count))
    return out
