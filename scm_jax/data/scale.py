"""The data's scale: stated statistics, the normalisation to TrigFlow's sigma_d, and its inverse.

TrigFlow (sCM §2.1) assumes data of standard deviation sigma_d and mean zero: the noise
z ~ N(0, sigma_d² I) and the time proposal are tuned for it. Images in [-1, 1] are not always
there (MNIST: mean -0.74, std 0.62, so at t_mid = 1.1 the signal-to-noise ratio is ~4x what the
paper tuned); the fix is EDM2's for latents, applied to any data:

    x_model = (x_data - mean[c]) * sigma_d / std[c]          (per channel c, the last axis)
    x_data  = x_model * std[c] / sigma_d + mean[c]           (the inverse, on samples)

``x_data`` is what a source yields before normalisation (images in [-1, 1]; raw latents) and what
every consumer of samples sees (grids, ``scm-jax sample``, FID, exports); ``x_model`` is what the
network, the losses and the samplers work in. The statistics are part of the run's config
(``dataset.normalize``, ``dataset.mean``, ``dataset.std``; for ``source='latents'``
``dataset.latent_mean`` / ``latent_std``), so every reader of a run inverts it the same way.
``scm-jax data-stats`` measures them (:func:`channel_stats`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

NORMALIZE_MODES = ("none", "per_channel")


@dataclasses.dataclass(frozen=True)
class DataScale:
    """A per-channel affine map between data units and model units (see the module docstring).

    Attributes:
      mean: ``(C,)`` per-channel means in data units (empty: the identity map).
      std: ``(C,)`` per-channel standard deviations in data units (> 0).
      sigma_d: the standard deviation the normalised data gets.
    """

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    sigma_d: float = 0.5

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} need the same length")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")

    @property
    def identity(self) -> bool:
        """True when encode and decode do nothing."""
        return not self.mean

    def _coefficients(self, x: Any, inverse: bool) -> tuple[Any, Any]:
        mean = np.asarray(self.mean, np.float32)
        gain = np.asarray(self.std, np.float32) / np.float32(self.sigma_d)
        if x.shape[-1] != len(mean):
            raise ValueError(
                f"data with {x.shape[-1]} channels (last axis of {tuple(x.shape)}) but the "
                f"data scale has {len(mean)}"
            )
        return (gain, mean) if inverse else (1 / gain, -mean / gain)

    def encode(self, x: Any) -> Any:
        """Data units -> model units; ``x`` ``(..., C)`` numpy or jax float, same type back."""
        if self.identity:
            return x
        a, b = self._coefficients(x, inverse=False)
        return (x * a + b).astype(x.dtype)

    def decode(self, x: Any) -> Any:
        """Model units -> data units; ``x`` ``(..., C)`` numpy or jax float, same type back."""
        if self.identity:
            return x
        a, b = self._coefficients(x, inverse=True)
        return (x * a + b).astype(x.dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly ``{'mean': [...], 'std': [...], 'sigma_d': float}``."""
        return {"mean": list(self.mean), "std": list(self.std), "sigma_d": self.sigma_d}


def data_scale(dataset_cfg: Mapping[str, Any], sigma_d: float) -> DataScale:
    """The :class:`DataScale` a config's ``dataset`` section describes.

    ``source='latents'``: ``latent_mean`` / ``latent_std`` (always applied; EDM2). Otherwise
    ``normalize='per_channel'``: ``mean`` / ``std``; ``normalize='none'``: the identity.

    Raises:
      ValueError: an unknown mode, or per-channel normalisation without statistics.
    """
    get = dataset_cfg.get
    if get("source") == "latents":
        mean, std = tuple(get("latent_mean", ()) or ()), tuple(get("latent_std", ()) or ())
        if not mean:  # the latents source refuses this when it loads; here: nothing to invert
            return DataScale(sigma_d=float(sigma_d))
        return DataScale(_floats(mean), _floats(std), float(sigma_d))
    mode = get("normalize", "none")
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"unknown dataset.normalize {mode!r}; choose one of {NORMALIZE_MODES}")
    if mode == "none":
        return DataScale(sigma_d=float(sigma_d))
    mean, std = tuple(get("mean", ()) or ()), tuple(get("std", ()) or ())
    if not mean or len(mean) != len(std):
        raise ValueError(
            "dataset.normalize='per_channel' needs dataset.mean and dataset.std (one value per "
            f"channel), got mean={list(mean)} std={list(std)}; measure them with `scm-jax "
            "data-stats --config ...`"
        )
    return DataScale(_floats(mean), _floats(std), float(sigma_d))


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(values, np.float64).reshape(-1))


@dataclasses.dataclass(frozen=True)
class ScaledSource:
    """A source whose ``take`` returns ``scale.encode`` of the wrapped source's examples.

    Attributes:
      source: any :class:`scm_jax.data.arrays.Source` (examples in data units).
      scale: the :class:`DataScale` applied in :meth:`take`.
    """

    source: Any
    scale: DataScale

    @property
    def num_classes(self) -> int:
        """Number of classes of the wrapped source."""
        return self.source.num_classes

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's shape (unchanged by the scale)."""
        return tuple(self.source.shape)

    def __len__(self) -> int:
        return len(self.source)

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 ``(n, *shape)`` examples in model units and int32 labels (or None)."""
        x, labels = self.source.take(indices)
        return self.scale.encode(np.asarray(x, np.float32)), labels


def channel_stats(
    source: Any,
    *,
    num: int = 0,
    chunk: int = 1024,
    log: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Per-channel mean and standard deviation of a source's examples (float64 accumulators).

    Args:
      source: a source yielding float ``(n, ..., C)`` examples (data units for a raw source).
      num: how many leading examples to read (0 = all).
      chunk: examples per read.
      log: optional ``log(done, total)`` after each chunk.
    Returns:
      ``{'num', 'mean': [C], 'std': [C], 'mean_all', 'std_all', 'rms_all', 'min', 'max'}``
      (floats; ``*_all`` over every value, the population std).
    """
    total = min(len(source), num) if num else len(source)
    if total < 1:
        raise ValueError("the dataset is empty")
    s1 = s2 = None
    lo, hi = np.inf, -np.inf
    for start in range(0, total, chunk):
        x, _ = source.take(np.arange(start, min(start + chunk, total)))
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
        s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        if log is not None:
            log(min(start + chunk, total), total)
    assert s1 is not None and s2 is not None
    count = total * int(np.prod(source.shape)) // len(s1)  # values per channel
    mean = s1 / count
    var = np.maximum(s2 / count - mean**2, 0.0)
    mean_all = float(s1.sum() / (count * len(s1)))
    ms_all = float(s2.sum() / (count * len(s1)))
    return {
        "num": int(total),
        "mean": [float(m) for m in mean],
        "std": [float(v) for v in np.sqrt(var)],
        "mean_all": mean_all,
        "std_all": float(np.sqrt(max(ms_all - mean_all**2, 0.0))),
        "rms_all": float(np.sqrt(ms_all)),
        "min": lo,
        "max": hi,
    }
