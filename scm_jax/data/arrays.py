"""In-memory datasets with a deterministic, resumable, per-process batch order.

The order is a pure function of (seed, step): global position p = step * batch + i falls in
epoch p // N at slot p % N of that epoch's permutation (drawn from ``seed`` and the epoch), so a
resumed run needs nothing but its step to continue exactly where it stopped, and every example
is seen once per epoch. Each process takes its contiguous slice of the global batch. Horizontal
flips, where a recipe uses them, are decided per (seed, epoch, slot) as well.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """Examples ``x`` ``(N, ...)`` float32 (images NHWC in [-1, 1], or vectors) and optional
    integer ``labels`` ``(N,)``."""

    x: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.x.ndim < 2 or len(self.x) == 0:
            raise ValueError(f"dataset needs a non-empty (N, ...) array, got shape {self.x.shape}")
        if self.labels is not None and self.labels.shape != (len(self.x),):
            raise ValueError(
                f"labels must have shape ({len(self.x)},) to match x, got {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.x)


def load_npz(path: str | Path, x_key: str = "x", label_key: str = "labels") -> ArrayDataset:
    """Load an ``.npz`` with examples under ``x_key`` and optional labels under ``label_key``.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: ``x_key`` is missing (the message lists the keys present).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    with np.load(path) as f:
        if x_key not in f:
            raise ValueError(f"{path} has no array {x_key!r}; it holds {sorted(f.files)}")
        x = np.asarray(f[x_key], np.float32)
        labels = np.asarray(f[label_key], np.int32) if label_key in f else None
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
    data: ArrayDataset,
    step: int,
    batch_size: int,
    seed: int,
    *,
    flip: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """This process's examples (and labels) of the global batch at ``step``.

    ``flip`` mirrors images ``(N, H, W, C)`` left-right where the deterministic flip bit is set.
    Returns ``(x, labels)`` with ``x`` of shape ``(batch_size / process_count, ...)``.
    """
    idx, flips = batch_indices(step, len(data), batch_size, seed, process_index, process_count)
    x = data.x[idx]
    if flip:
        if x.ndim != 4:
            raise ValueError(f"flips apply to images (N, H, W, C), got shape {x.shape}")
        x = np.where(flips[:, None, None, None], x[:, :, ::-1], x)
    labels = None if data.labels is None else data.labels[idx]
    return x, labels
