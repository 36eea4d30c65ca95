"""Data: in-memory datasets with a deterministic, resumable, per-process order (``arrays``).

TFDS / grain pipelines, image folders, latent files and MNIST-5k land with the train loop.
"""

from scm_jax.data.arrays import ArrayDataset, batch_indices, get_batch, load_npz

__all__ = ["ArrayDataset", "batch_indices", "get_batch", "load_npz"]
