"""Random-access data sources with a deterministic, resumable, per-process batch order.

A *source* (:class:`Source`) is anything with ``len``, ``num_classes``, ``shape`` (one example's)
and ``take(indices)`` returning examples in model units; :class:`ArrayDataset` is the in-memory
one (images kept as uint8, converted in ``take``). ``scm_jax.data.sources.load_dataset`` builds
a source from a config's ``dataset`` section.

The order is a pure function of (seed, step): global position p = step * batch + i falls in
epoch p // N at slot p % N of that epoch's permutation (drawn from ``seed`` and the epoch), so a
resumed run needs nothing but its step to continue exactly where it stopped, and every example
is seen once per epoch. Each process takes its contiguous slice of the global batch. Horizontal
flips, where a recipe uses them, are decided per (seed, epoch, slot) as well.
"""

from __future__ import annotations

import dataclasses
import functools
import zipfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Source(Protocol):
    """Random access to N examples, returned in model units.

    Attributes:
      num_classes: number of classes K (labels in [0, K)); 0 = unconditional (no labels).
      shape: one example's shape, e.g. ``(H, W, C)`` for images, ``(D,)`` for vectors.
    """

    num_classes: int
    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Examples at ``indices`` ``(n,)``: float32 ``(n, *shape)`` in model units (images in
        [-1, 1], latents normalised) and int32 labels ``(n,)``, or None when unconditional."""
        ...


def uint8_to_model(x: np.ndarray) -> np.ndarray:
    """Images uint8 in [0, 255] -> float32 in [-1, 1] (same shape)."""
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1)


def class_interleaved_order(labels: np.ndarray) -> np.ndarray:
    """A stable reordering that visits classes in turn: the first example of every class (in
    label order), then the second of each, and so on; any prefix is as class-balanced as it can be.

    Args:
      labels: ``(N,)`` integer labels, in the data's original order.
    Returns:
      ``(N,)`` int64 indices into the original order.
    """
    labels = np.asarray(labels)
    rank = np.empty(len(labels), np.int64)  # position of each example within its class
    for c in np.unique(labels):
        sel = labels == c
        rank[sel] = np.arange(int(sel.sum()))
    return np.lexsort((np.arange(len(labels)), labels, rank))


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """In-memory examples ``x`` ``(N, ...)`` and optional integer ``labels`` ``(N,)``.

    ``x`` is either uint8 images in [0, 255] (stored as is, 1 byte per value, and mapped to
    [-1, 1] float32 by :meth:`take`) or a float array already in model units (stored as float32).
    ``num_classes`` defaults to ``max(labels) + 1`` (0 without labels); labels must lie in
    [0, num_classes).
    """

    x: np.ndarray
    labels: np.ndarray | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        x = np.asarray(self.x)
        if x.ndim < 2 or len(x) == 0:
            raise ValueError(f"dataset needs a non-empty (N, ...) array, got shape {x.shape}")
        if x.dtype != np.uint8:
            if not np.issubdtype(x.dtype, np.floating):
                raise ValueError(
                    f"dataset examples must be uint8 images in [0, 255] or floats in model units, "
                    f"got dtype {x.dtype}; convert them (e.g. x.astype(np.uint8))"
                )
            x = np.asarray(x, np.float32)
        object.__setattr__(self, "x", x)
        if self.labels is None:
            if self.num_classes:
                raise ValueError(f"num_classes={self.num_classes} but the dataset has no labels")
            object.__setattr__(self, "num_classes", 0)
            return
        labels = np.asarray(self.labels)
        if labels.shape != (len(x),):
            raise ValueError(f"labels must have shape ({len(x)},) to match x, got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        lo, hi = int(labels.min()), int(labels.max())
        num_classes = hi + 1 if self.num_classes is None else int(self.num_classes)
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, num_classes={num_classes}), found labels in [{lo}, {hi}]"
            )
        object.__setattr__(self, "labels", labels.astype(np.int32, copy=False))
        object.__setattr__(self, "num_classes", num_classes)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's shape ``x.shape[1:]``."""
        return tuple(self.x.shape[1:])

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Examples at ``indices`` ``(n,)``: float32 ``(n, *shape)`` in model units, int32 labels
        ``(n,)`` or None."""
        x = self.x[indices]
        x = uint8_to_model(x) if x.dtype == np.uint8 else x
        return x, None if self.labels is None else self.labels[indices]


def load_npz(path: str | Path, x_key: str = "x", label_key: str = "labels") -> ArrayDataset:
    """Load an ``.npz`` with examples under ``x_key`` and optional labels under ``label_key``.

    uint8 examples are kept as images in [0, 255] (``take`` maps them to [-1, 1]); float examples
    are taken as already in model units (stored as float32).

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: ``x_key`` is missing (the message lists the keys present).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"dataset file {str(path)!r} is empty (0 bytes); give an .npz of examples")
    try:
        with np.load(path, allow_pickle=False) as f:
            if x_key not in f:
                raise ValueError(f"{path} has no array {x_key!r}; it holds {sorted(f.files)}")
            x = f[x_key]
            labels = f[label_key] if label_key in f else None
    except (EOFError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"dataset file {str(path)!r} is not a readable .npz ({e})") from None
    if x.ndim >= 1 and len(x) == 0:
        raise ValueError(f"dataset file {str(path)!r} holds no examples ({x_key!r} has shape "
                         f"{x.shape}); give an .npz with at least one")  # fmt: skip
    return ArrayDataset(x, labels)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's permutation and flip bits, drawn once per epoch (not once per step)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    flips = np.random.default_rng([seed, epoch, 1]).random(n) < 0.5
    perm.flags.writeable = flips.flags.writeable = False  # cached: shared between calls
    return perm, flips


def batch_indices(
    step: int,
    num_examples: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Example indices of this process's part of the global batch at ``step``.

    Args:
      step: optimiser step (the batch number, from 0).
      num_examples: dataset size N.
      batch_size: global batch; must be divisible by ``process_count``.
      seed: data-order seed.
      process_index, process_count: this process and the number of processes.
    Returns:
      ``(indices, flip_bits)``: ``(batch_size / process_count,)`` int64 example indices and bool
      flags for an optional horizontal flip, both deterministic in (seed, step).
    """
    if batch_size % process_count:
        raise ValueError(
            f"global batch {batch_size} is not divisible by the {process_count} processes"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local = batch_size // process_count
    start = step * batch_size + process_index * local
    positions = np.arange(start, start + local, dtype=np.int64)
    epochs, slots = positions // num_examples, positions % num_examples
    indices = np.empty(local, np.int64)
    flips = np.empty(local, bool)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        perm, epoch_flips = _epoch_order(seed, int(epoch), num_examples)
        indices[sel] = perm[slots[sel]]
        flips[sel] = epoch_flips[slots[sel]]
    return indices, flips


def get_batch(
    data: Source,
    step: int,
    batch_size: int,
    seed: int,
    *,
    flip: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """This process's examples (and labels) of the global batch at ``step``.

    Args:
      data: any :class:`Source` (read with ``data.take(indices)``).
      step, batch_size, seed, process_index, process_count: as in :func:`batch_indices`.
      flip: mirror images ``(n, H, W, C)`` left-right where the deterministic flip bit is set.
    Returns:
      ``(x, labels)``: float32 ``(batch_size / process_count, *data.shape)`` in model units and
      int32 labels of that length, or None for an unconditional source.
    """
    idx, flips = batch_indices(step, len(data), batch_size, seed, process_index, process_count)
    x, labels = data.take(idx)
    if flip:
        if x.ndim != 4:
            raise ValueError(f"flips apply to images (N, H, W, C), got shape {x.shape}")
        x = np.where(flips[:, None, None, None], x[:, :, ::-1], x)
    return x, labels
