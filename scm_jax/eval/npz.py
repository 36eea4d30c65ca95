"""Reading the evaluation's own ``.npz`` files (FID statistics, converted Inception weights)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


def read_npz(path: Path, hint: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path`` (an existing file), read without pickles.

    Args:
      path: the file; its existence is the caller's check (its message says what the file is).
      hint: what the file should be and how to make one, appended to error messages.
    Returns:
      ``{name: array}`` of all entries.
    Raises:
      ValueError: naming the file and the hint: not a zip archive, a bare ``.npy``, or unreadable
        (truncated, corrupt entries, pickled objects).
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz (zip) file; {hint}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array")
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{path} is not a readable .npz file ({e}); {hint}") from None
