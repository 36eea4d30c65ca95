"""A cheap, plotting-free quality score for class-conditional samples: 1-nearest-neighbour label
agreement (``benchmarks/mnist_default.py``, the ablation notebooks).

A 1-NN classifier on reference examples (e.g. the 5,000 MNIST training digits) labels each
sample; the score is how often it agrees with the class the sample was drawn for (chance:
1 / K). On real MNIST test digits the same classifier is right about 90% of the time.
"""

from __future__ import annotations

import numpy as np


def nn_label_agreement(
    x: np.ndarray, labels: np.ndarray, ref_x: np.ndarray, ref_y: np.ndarray, chunk: int = 1024
) -> float:
    """Fraction of ``x`` whose nearest (L2) reference example has the label in ``labels``.

    Args:
      x: ``(N, ...)`` float samples (any layout; flattened), in the value range of ``ref_x``.
      labels: ``(N,)`` int, the class each sample was drawn for.
      ref_x: ``(M, ...)`` reference examples with the per-sample size of ``x``.
      ref_y: ``(M,)`` int labels of the reference examples.
      chunk: samples per distance matrix (bounds memory at ``chunk x M`` float32).
    Returns:
      A Python float in [0, 1].
    """
    a = np.asarray(x, np.float32).reshape(len(x), -1)
    b = np.asarray(ref_x, np.float32).reshape(len(ref_x), -1)
    labels, ref_y = np.asarray(labels), np.asarray(ref_y)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"samples {np.shape(x)} and references {np.shape(ref_x)} differ in size")
    if labels.shape != (len(a),) or ref_y.shape != (len(b),):
        raise ValueError(
            f"labels {labels.shape} and ref_y {ref_y.shape} must be ({len(a)},) and ({len(b)},)"
        )
    b2 = (b * b).sum(1)[None]
    hits = 0
    for i in range(0, len(a), chunk):
        ai = a[i : i + chunk]
        d = (ai * ai).sum(1)[:, None] - 2 * ai @ b.T + b2
        hits += int(np.sum(ref_y[d.argmin(1)] == labels[i : i + chunk]))
    return hits / max(len(a), 1)
