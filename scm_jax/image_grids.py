"""Images on the host: [-1, 1] floats to uint8, sample grids, PNG and ``.npz`` files.

Conventions: generated images are NHWC floats in [-1, 1]; files and TensorBoard get uint8 HWC.
A grid of 1-channel images stays 1-channel (Pillow saves it as an 8-bit grayscale 'L' PNG, a
third of the size of RGB; TensorBoard shows it as grayscale).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from scm_jax.files import atomic_write


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Map floats in [-1, 1] to uint8 [0, 255]: round((x + 1) * 127.5), clipped; NaN -> 0.

    Args:
      x: any shape (typically ``(N, H, W, C)``), any float dtype (bfloat16 included).
    Returns:
      uint8 array of the same shape.
    """
    x = np.nan_to_num(np.asarray(x, np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images into one image with ``pad`` black pixels between and around the cells.

    Args:
      images: ``(N, H, W, C)`` (or ``(N, H, W)``) floats in [-1, 1], or uint8 (used as is).
      ncols: columns; default ``ceil(sqrt(N))`` (a square-ish grid). Rows: ``ceil(N / ncols)``.
      pad: border width in pixels (>= 0).
    Returns:
      uint8 ``(rows * (H + pad) + pad, ncols * (W + pad) + pad, C)``; C as given (1 stays 1).
      Cells beyond N are black.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected (N, H, W, C) images with N >= 1, got shape {images.shape}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n)) if ncols is None else ncols
    if cols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    pixels = images if images.dtype == np.uint8 else to_uint8(images)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = pixels[i]
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 ``(H, W, C)`` image (C in 1, 3, 4; or ``(H, W)``) as PNG; makes parents.

    C = 1 (or 2-D) is saved as 8-bit grayscale 'L', 3 as 'RGB', 4 as 'RGBA'.
    """
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8, got {image.dtype}; use to_uint8 first")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        raise ValueError(f"expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Pillow infers 'L' / 'RGB' / 'RGBA' from a uint8 array's shape.
    with atomic_write(path) as f:  # an existing file is replaced whole or not at all
        Image.fromarray(np.ascontiguousarray(image)).save(f, format="PNG")


def save_grid(
    path: str | os.PathLike, images: np.ndarray, ncols: int | None = None, pad: int = 1
) -> np.ndarray:
    """:func:`make_grid` of ``(N, H, W, C)`` images in [-1, 1] saved as PNG; returns the grid."""
    grid = make_grid(images, ncols=ncols, pad=pad)
    save_png(path, grid)
    return grid


def save_samples_npz(
    path: str | os.PathLike, x: np.ndarray, labels: np.ndarray | None = None
) -> None:
    """Write generated samples to ``.npz``: ``x`` as float32 (values as generated, not
    quantised), and ``labels`` (int32, ``(N,)``) when given. Makes parent folders.

    Args:
      x: ``(N, ...)`` samples, e.g. ``(N, H, W, C)`` in [-1, 1].
      labels: optional ``(N,)`` class labels (or ``(N, ...)`` conditioning, stored as given).
    """
    x = np.asarray(x, np.float32)
    arrays = {"x": x}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[:1] != x.shape[:1]:
            raise ValueError(f"labels {labels.shape} do not match samples {x.shape}")
        arrays["labels"] = labels.astype(np.int32) if labels.dtype.kind in "iub" else labels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:  # an existing file is replaced whole or not at all
        np.savez(f, **arrays)
