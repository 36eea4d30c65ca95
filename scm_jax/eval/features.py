"""FID features: the Inception extractor, the sharded feature pipeline and dataset statistics.

  ext = load_extractor()                      # --inception / $SCM_JAX_INCEPTION / ~/.cache
  mu, sigma, n, secs = dataset_stats(source, 50_000, features=ext, mesh=mesh)

One jitted function per batch maps images to Inception features and adds them to the running
``scm_jax.eval.feature_stats.FeatureStats``; batches have one fixed size (a multiple of the mesh's
device count, split over ``('data', 'fsdp')``), the last one padded and masked. Float images in
[-1, 1] are first quantised like saved PNGs (``scm_jax.image_grids.to_uint8``: u = round((x + 1)
127.5), clipped to 0..255, NaN -> 0), and every uint8 image is then mapped to the network's range
with the recorded ``input_convention`` ('tf': (u - 128) / 128). Data sources give u / 127.5 - 1,
which quantises back to u exactly, so datasets and samples go through the same pipeline. A model's
samples go through it in ``scm_jax.eval.runner``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scm_jax.console import format_duration
from scm_jax.eval import feature_stats, fid
from scm_jax.eval.inception import DEFAULT_RESIZE, RESIZE_METHODS, WEIGHTS_FILENAME
from scm_jax.sharding import batch_sharding, make_mesh

Array = jax.Array
Log = Callable[[str], None]

ENV_VAR = "SCM_JAX_INCEPTION"
DEFAULT_WEIGHTS = Path("~/.cache/scm_jax") / WEIGHTS_FILENAME
CONVENTIONS = ("tf", "pytorch-fid")
DEFAULT_CONVENTION = "tf"
PROGRESS_SECONDS = 10.0  # at most one progress line per this many seconds (plus first and last)


def _print(line: str) -> None:
    print(line, flush=True)


def default_batch_size() -> int:
    """Images per call when none is given: 256 on accelerators, 64 on CPUs (where batches of
    299x299 Inception activations beyond that only cost memory traffic)."""
    return 64 if jax.default_backend() == "cpu" else 256


# ------------------------------------------------------------------ the feature extractor


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """Where the Inception weights are: ``path``, else ``$SCM_JAX_INCEPTION``, else
    ``~/.cache/scm_jax/inception_fid.npz`` (a folder means ``<folder>/inception_fid.npz``).

    Raises:
      FileNotFoundError: nothing there; the message names where it looked and how to create the
        file with ``scm-jax fid-weights``.
    """
    where = "--inception"
    if not path:
        path, where = os.environ.get(ENV_VAR, ""), f"${ENV_VAR}"
    if not path:
        path, where = DEFAULT_WEIGHTS, "the default location"
    p = Path(path).expanduser()
    p = p / WEIGHTS_FILENAME if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(
            f"no FID Inception weights at {p} ({where}); create them once with `scm-jax "
            f"fid-weights --from inception_v3_fid_torchscript.pt --out {p.parent}` (StyleGAN3's "
            "TorchScript detector, or pytorch-fid's pt_inception-2015-12-05-6726825d.pth; needs "
            f"torch), then pass --inception PATH or set ${ENV_VAR}"
        )
    return p


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """``apply(params, images) -> features``: images ``(B, H, W, 1|3)`` float32 in the network's
    range, features ``(B, dim)`` float32. ``info`` is ``load_inception``'s metadata (``variant``,
    ``source_sha256``); ``resize`` and ``convention`` are recorded with every statistics file."""

    apply: Callable[[Any, Array], Array]
    params: Any
    dim: int
    info: dict
    resize: str = DEFAULT_RESIZE
    convention: str = DEFAULT_CONVENTION

    def meta(self, source: str, **extra: Any) -> dict:
        """Metadata for ``fid.save_stats`` / ``fid.fid_from_stats`` of features made here."""
        return fid.inception_meta(
            self.info, self.resize, source, input_convention=self.convention, **extra
        )


def load_extractor(
    path: str | os.PathLike | None = None, resize: str = DEFAULT_RESIZE,
    convention: str = DEFAULT_CONVENTION,
) -> FeatureExtractor:  # fmt: skip
    """The FID Inception-v3 (2048-d pool3) from converted weights (see
    :func:`resolve_inception_path`), resizing with ``resize`` (``inception.RESIZE_METHODS``) and
    mapping uint8 pixels with ``convention`` ('tf' or 'pytorch-fid').

    Raises:
      FileNotFoundError: no weights file; ValueError: not the weights file, bad resize/convention.
    """
    from scm_jax.eval.inception import FEATURE_DIM, inception_features, load_inception

    if resize not in RESIZE_METHODS:
        raise ValueError(f"unknown resize {resize!r}; use one of {', '.join(RESIZE_METHODS)}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown input convention {convention!r}; use one of {CONVENTIONS}")
    params, info = load_inception(resolve_inception_path(path))
    apply = functools.partial(inception_features, resize=resize)
    return FeatureExtractor(apply, params, FEATURE_DIM, info, resize, convention)


def check_image_shape(shape: Sequence[int], what: str) -> None:
    """Raise ValueError unless ``shape`` is one image's ``(H, W, 1 or 3)``."""
    if len(shape) != 3 or shape[-1] not in (1, 3):
        raise ValueError(
            f"FID needs images (H, W, 1 or 3 channels); {what} has examples of shape "
            f"{tuple(shape)} (latents must be decoded to pixels first; points have no FID)"
        )


def to_network_range(images: Array, convention: str) -> Array:
    """uint8 (or integer) pixels, or float images in [-1, 1] quantised like saved PNGs
    (``scm_jax.image_grids.to_uint8``), -> float32 in the network's range
    (``to_inception_range``)."""
    from scm_jax.eval.inception import to_inception_range

    if jnp.issubdtype(images.dtype, jnp.floating):
        x = jnp.nan_to_num(images.astype(jnp.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
        images = jnp.clip(jnp.rint((x + 1.0) * 127.5), 0, 255)
    return to_inception_range(images, convention)


_AOT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_once(fn: Any, *args: Any) -> tuple[Any, float]:
    """``fn.lower(*args).compile()``, cached per jitted ``fn`` and argument signature (shapes,
    dtypes, shardings), so a periodic evaluation compiles once; returns ``(compiled, seconds)``.
    ``args`` may hold ``jax.ShapeDtypeStruct`` leaves with shardings."""
    leaves, tree = jax.tree.flatten(args)
    sig = (tree, *((tuple(a.shape), str(a.dtype), getattr(a, "sharding", None)) for a in leaves))
    cache = _AOT.setdefault(fn, {})
    t0 = time.perf_counter()
    if sig not in cache:
        cache[sig] = fn.lower(*args).compile()
    return cache[sig], time.perf_counter() - t0


class FeaturePipeline:
    """Images -> features -> ``FeatureStats``, one jitted, batch-sharded call per batch.

    Args:
      extractor: the feature network.
      mesh: batches are split over its ``('data', 'fsdp')`` axes; statistics and the extractor's
        parameters are replicated on it.
      batch_size: images per call, rounded up to a multiple of ``mesh.size``.
    """

    def __init__(self, extractor: FeatureExtractor, mesh: Mesh, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.extractor, self.mesh = extractor, mesh
        self.batch = math.ceil(batch_size / mesh.size) * mesh.size
        self.sharding = batch_sharding(mesh)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.params = jax.device_put(extractor.params, self.replicated)
        convention = extractor.convention

        def step(params: Any, stats: feature_stats.FeatureStats, images: Array, mask: Array):
            feats = extractor.apply(params, to_network_range(images, convention))
            return feature_stats.update(stats, feats, mask)

        self._step = jax.jit(step, out_shardings=self.replicated)
        self._compiled: dict[tuple, Any] = {}  # (images shape, dtype) -> executable

    def init(self) -> feature_stats.FeatureStats:
        """Empty statistics, replicated on the mesh."""
        return feature_stats.init(self.extractor.dim, mesh=self.mesh)

    def place(self, images: Any) -> tuple[Array, Array]:
        """``(images, mask)`` on the mesh: host ``(n <= batch, H, W, C)`` arrays are padded with
        zeros to ``(batch, ...)``; the mask ``(batch,)`` bool marks the n real rows."""
        n = images.shape[0]
        if n > self.batch:
            raise ValueError(f"{n} images for a pipeline of batch {self.batch}")
        if not isinstance(images, jax.Array):
            images = np.asarray(images)
            pad = np.zeros((self.batch - n, *images.shape[1:]), images.dtype)
            images = np.concatenate([images, pad]) if n < self.batch else images
        elif n < self.batch:
            raise ValueError(f"device arrays must hold a full batch of {self.batch}, got {n}")
        mask = np.arange(self.batch) < n
        return jax.device_put(images, self.sharding), jax.device_put(mask, self.sharding)

    def compile(self, stats: feature_stats.FeatureStats, images: Any, mask: Array) -> float:
        """Compile for these inputs' shapes and shardings ahead of time (``images`` may be a
        ``jax.ShapeDtypeStruct``); returns the seconds it took (0 when already compiled)."""
        key = (tuple(images.shape), str(images.dtype))
        self._compiled[key], seconds = compile_once(self._step, self.params, stats, images, mask)
        return seconds

    def __call__(
        self, stats: feature_stats.FeatureStats, images: Array, mask: Array
    ) -> feature_stats.FeatureStats:
        """Add the masked rows of placed ``images`` (from :meth:`place`) to ``stats``."""
        fn = self._compiled.get((tuple(images.shape), str(images.dtype)), self._step)
        return fn(self.params, stats, images, mask)


class ImageProgress:
    """Rate and ETA lines, at most one per ``PROGRESS_SECONDS`` (plus the first and last)."""

    def __init__(self, what: str, total: int, log: Log) -> None:
        self.what, self.total, self.log = what, total, log
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if done < self.total and done > 0 and now - self.last < PROGRESS_SECONDS and extra == "":
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        self.log(
            f"  {self.what}: {done}/{self.total} images ({100 * done / self.total:.0f}%)  "
            f"{rate:.3g} img/s  ETA {format_duration(eta)}{extra}"
        )


def check_num(num: int, dim: int, what: str, log: Log) -> None:
    """ValueError for fewer than 2 images; a note when ``num`` <= the feature dimension."""
    if num < 2:
        raise ValueError(f"FID statistics need at least 2 images, got num={num} ({what})")
    if num <= dim:
        log(
            f"  note: {num} images for {dim}-d features: the covariance is singular and the FID "
            "is biased upwards (use 10k+ to compare models; 50k is standard)"
        )


def as_pipeline(
    features: FeatureExtractor | FeaturePipeline, mesh: Mesh | None, batch_size: int | None
) -> FeaturePipeline:
    """``features`` itself if it is a pipeline, else a new one over ``mesh`` (default: all
    devices on the 'data' axis) with ``batch_size`` (default :func:`default_batch_size`)."""
    if isinstance(features, FeaturePipeline):
        return features
    mesh = make_mesh(-1, 1) if mesh is None else mesh
    return FeaturePipeline(features, mesh, batch_size or default_batch_size())


# ---------------------------------------------------------------------------------- datasets


def dataset_stats(
    source: Any, num: int, *, features: FeatureExtractor | FeaturePipeline,
    mesh: Mesh | None = None, batch_size: int | None = None, log: Log = _print,
) -> tuple[np.ndarray, np.ndarray, int, float]:  # fmt: skip
    """Feature statistics of a data source's first ``num`` examples.

    Args:
      source: a ``scm_jax.data`` source (``take(indices) -> (float32 (n, H, W, C) in [-1, 1],
        labels)``, ``len``, ``shape``).
      num: how many examples (the first ``num`` in the source's order), 2 <= num <= len.
      features: the extractor (a pipeline over ``mesh`` with ``batch_size`` is built) or a
        ready :class:`FeaturePipeline` (then ``mesh`` and ``batch_size`` are its own).
      log: progress lines.
    Returns:
      ``(mu (D,) float64, sigma (D, D) float64, n, seconds)``.
    Raises:
      ValueError: ``num`` < 2 or more than the source holds; not images.
    """
    check_image_shape(source.shape, "the dataset")
    if num > len(source):
        raise ValueError(f"asked for {num} images but the dataset holds only {len(source)}")
    pipe = as_pipeline(features, mesh, batch_size)
    check_num(num, pipe.extractor.dim, "dataset", log)
    stats = pipe.init()
    t0 = time.perf_counter()
    for start in range(0, num, pipe.batch):
        x, _ = source.take(np.arange(start, min(start + pipe.batch, num)))
        images, mask = pipe.place(x)  # prepared while the device works on the previous batch
        if start == 0:
            log(f"  compiled the feature step in {pipe.compile(stats, images, mask):.1f} s")
            progress = ImageProgress("features", num, log)
        else:
            jax.block_until_ready(stats.count)  # one batch in flight: bounded memory, true rate
            progress(start)
        stats = pipe(stats, images, mask)
    jax.block_until_ready(stats.count)
    progress(num)
    mu, sigma, n = feature_stats.finalize(stats)
    return mu, sigma, n, time.perf_counter() - t0


def check_reference(ref: fid.StatsTuple, dim: int) -> None:
    """Raise ValueError unless reference statistics ``(mu, sigma, n, meta)`` are ``dim``-d."""
    if ref[0].shape[0] != dim:
        raise ValueError(
            f"reference statistics {ref[3].get('path', '')} are of {ref[0].shape[0]}-d features "
            f"but the feature extractor gives {dim}-d: they come from another feature network"
        )
