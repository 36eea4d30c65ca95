"""Random access to a prepared TFDS dataset (ArrayRecord), without TensorFlow.

``tfds.data_source`` opens the prepared files; ``grain.MapDataset.source(...).map(...)`` decodes
each record's ``image`` / ``label`` into model units; :meth:`TfdsSource.take` reads a batch's
indices with a few threads. Preparing a dataset needs TensorFlow once (``tfds build``); reading
it does not.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
from typing import Any

import numpy as np

from scm_jax.data.arrays import uint8_to_model
from scm_jax.data.images import decode_image


def _prepare_hint(name: str, data_dir: str) -> str:
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    return (
        f"prepare it once with `pip install tensorflow-cpu && tfds build {name} "
        f"--file_format=array_record{dir_flag}`, or use --config.dataset.source=image_folder "
        "with a folder or .tar.gz of <class>/*.png|jpg"
    )


def open_tfds(name: str, *, split: str, data_dir: str = "") -> Any:
    """``tfds.data_source(name, split=split, data_dir=data_dir or None)``, never downloading.

    Returns:
      The random-access data source (``len``, ``[i]`` -> a dict of numpy features).
    Raises:
      ValueError: an unknown dataset name, or one prepared as TFRecord (no random access).
      FileNotFoundError: the dataset is not prepared in ``data_dir`` (the message says how to
        prepare it).
    """
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"unknown TFDS dataset {name!r} (dataset.tfds_name); see "
            "https://www.tensorflow.org/datasets/catalog/overview"
        ) from None
    except Exception as e:  # diagnose the usual causes; re-raise anything else unchanged
        builder = tfds.builder(name, data_dir=data_dir or None)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; "
                + _prepare_hint(name, data_dir)
            ) from e
        file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
        if file_format not in ("array_record", "parquet"):
            raise ValueError(
                f"TFDS dataset {name!r} in {builder.data_dir} is stored as {file_format}, which "
                f"has no random access; rebuild it with --file_format=array_record: "
                + _prepare_hint(name, data_dir)
            ) from e
        raise


class TfdsSource:
    """A :class:`~scm_jax.data.arrays.Source` over a prepared TFDS dataset's ``image``/``label``.

    Args:
      name: TFDS name, e.g. ``'cifar10'`` or ``'imagenet_resized/64x64'``.
      split: TFDS split (slicing such as ``'train[:10%]'`` works).
      data_dir: TFDS data folder ('' = TFDS's default).
      shape: ``(H, W, C)`` every image must have.
      num_classes: K; must equal the dataset's label count. 0: labels are not read.
      num_examples: > 0 keeps the first this many examples.
      threads: reader threads used by :meth:`take`.
    """

    def __init__(
        self,
        name: str,
        *,
        split: str,
        data_dir: str = "",
        shape: tuple[int, ...],
        num_classes: int = 0,
        num_examples: int = 0,
        threads: int = 0,
    ) -> None:
        import grain

        self.name, self.shape, self.num_classes = name, tuple(int(s) for s in shape), num_classes
        raw = open_tfds(name, split=split, data_dir=data_dir)
        self._check_features(getattr(raw, "dataset_info", None))
        ds = grain.MapDataset.source(raw).map(self._decode)
        if num_examples:
            if num_examples > len(ds):
                raise ValueError(
                    f"dataset.num_examples={num_examples} but TFDS {name!r} split {split!r} "
                    f"holds {len(ds)} examples"
                )
            ds = ds.slice(slice(0, num_examples))
        self._ds = ds
        self._threads = threads or max(1, min(16, os.cpu_count() or 1))
        self._pool: cf.ThreadPoolExecutor | None = None

    def _check_features(self, info: Any) -> None:
        """Compare the dataset's declared features with the config (when the info is known)."""
        features = getattr(info, "features", None)
        if features is None:
            return
        keys = list(features.keys())
        needed = ["image"] + (["label"] if self.num_classes else [])
        missing = [k for k in needed if k not in keys]
        if missing:
            raise ValueError(f"TFDS {self.name!r} has no feature(s) {missing}; it has {keys}")
        declared = tuple(getattr(features["image"], "shape", ()) or ())
        if len(declared) != len(self.shape) or any(
            d is not None and d != s for d, s in zip(declared, self.shape, strict=False)
        ):
            raise ValueError(
                f"TFDS {self.name!r} images have shape {declared} but dataset.shape is "
                f"{self.shape}; set --config.dataset.shape"
            )
        k = getattr(features["label"], "num_classes", None) if self.num_classes else None
        if k is not None and k != self.num_classes:
            raise ValueError(
                f"TFDS {self.name!r} has {k} classes but dataset.num_classes={self.num_classes}"
            )

    def _decode(self, record: dict[str, Any]) -> tuple[np.ndarray, int]:
        """One record -> (float32 image ``shape`` in [-1, 1], label or -1)."""
        image = record["image"]
        if isinstance(image, bytes):
            image = decode_image(image, self.shape, f"TFDS {self.name!r} record")
        image = np.asarray(image)
        if image.shape != self.shape or image.dtype != np.uint8:
            raise ValueError(
                f"TFDS {self.name!r} gives {image.dtype} images of shape {image.shape}; expected "
                f"uint8 {self.shape} (dataset.shape)"
            )
        label = int(record["label"]) if self.num_classes else -1
        if not -1 <= label < self.num_classes:
            raise ValueError(
                f"TFDS {self.name!r} label {label} is outside [0, {self.num_classes}) "
                f"(dataset.num_classes={self.num_classes})"
            )
        return uint8_to_model(image), label

    def __len__(self) -> int:
        return len(self._ds)

    def _read(self, indices: np.ndarray, x: np.ndarray, labels: np.ndarray, lo: int) -> None:
        for j, i in enumerate(indices.tolist()):
            x[lo + j], labels[lo + j] = self._ds[i]

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Examples at ``indices`` ``(n,)``: float32 ``(n, H, W, C)`` in [-1, 1] and int32 labels
        ``(n,)`` (None when ``num_classes`` is 0), read by ``threads`` threads."""
        indices = np.asarray(indices)
        x = np.empty((len(indices), *self.shape), np.float32)
        labels = np.empty(len(indices), np.int32)
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(self._threads, thread_name_prefix="tfds")
        bounds = np.linspace(0, len(indices), min(self._threads, len(indices)) + 1).astype(int)
        jobs = [
            self._pool.submit(self._read, indices[lo:hi], x, labels, lo)
            for lo, hi in itertools.pairwise(bounds)
        ]
        for job in jobs:
            job.result()
        return x, labels if self.num_classes else None
