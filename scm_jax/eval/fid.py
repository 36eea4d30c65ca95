"""FID: the Fréchet distance between feature statistics, and the statistics files.

  mu, sigma, n = feature_stats.finalize(stats)          # streamed: scm_jax.eval.feature_stats
  save_stats("cifar10-train.npz", mu, sigma, n, inception_meta(info, resize, "CIFAR-10 train"))
  value, notes = fid_from_stats("cifar10-train.npz", (mu2, sigma2, n2, meta2))

The Fréchet distance between the Gaussians N(mu1, S1) and N(mu2, S2) fitted to two feature sets
(Dowson & Landau 1982; FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule
Converge to a Local Nash Equilibrium", NeurIPS) is

  d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

tr((S1 S2)^(1/2)) is computed as sum_i sqrt(lambda_i) with lambda_i the eigenvalues of the
symmetric positive semi-definite S1^(1/2) S2 S1^(1/2) (similar to S1 S2, so the same eigenvalues;
S1^(1/2) from ``eigh``). Unlike ``scipy.linalg.sqrtm(S1 @ S2)`` (pytorch-fid, TTUR) this needs no
complex arithmetic, no discarded imaginary parts and no diagonal offset for singular covariances
(fewer samples than feature dimensions): round-off eigenvalues below 0 are clipped to 0.

The statistics are accumulated on the accelerator by ``scm_jax.eval.feature_stats``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from scm_jax.eval.npz import read_npz
from scm_jax.files import atomic_write

Array = jax.Array
StatsTuple = tuple[np.ndarray, np.ndarray, int | None, dict]

STATS_FORMAT = "scm-jax/fid-stats"
STATS_FORMAT_VERSION = 1
META_KEY = "__meta__"
FEATURE_EXTRACTOR = "inception-v3-fid/pool3"
# Metadata that must agree for two statistics to be comparable (a difference is reported).
COMPARED_KEYS = ("feature_extractor", "weights_variant", "weights_sha256", "resize")


def stats_from_features(features: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Float64 reference: mean and unbiased covariance (``np.cov(rowvar=False)``) of features.

    Two passes over ``chunk`` rows at a time (mean first, then centred outer products), so the
    float64 copy never exceeds ``chunk`` rows.

    Args:
      features: ``(N, D)`` any float dtype, N >= 2.
    Returns:
      ``(mu (D,) float64, sigma (D, D) float64)``.
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features (N >= 2, D), got shape {features.shape}")
    n, d = features.shape
    mu = np.zeros(d)
    for i in range(0, n, chunk):
        mu += features[i : i + chunk].sum(0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((d, d))
    for i in range(0, n, chunk):
        c = features[i : i + chunk].astype(np.float64) - mu
        sigma += c.T @ c
    sigma /= n - 1
    return mu, (sigma + sigma.T) / 2


def _check_stats(mu: Any, sigma: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(
            f"{name}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: non-finite values in mu or sigma")
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    if np.abs(sigma - sigma.T).max() > 1e-3 * scale:
        raise ValueError(f"{name}: sigma is not symmetric, so not a covariance")
    return mu, (sigma + sigma.T) / 2


def _clip_roundoff(w: np.ndarray) -> np.ndarray:
    """Eigenvalues at the round-off level of ``eigh`` (|w| <= D eps max|w|) -> 0, negatives -> 0.

    Their square roots would otherwise add O(sqrt(eps)) per null direction of a singular matrix.
    """
    tol = w.shape[0] * np.finfo(w.dtype).eps * max(float(np.abs(w).max()), 0.0)
    return np.where(w > tol, w, 0.0)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (the FID).

    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^(1/2) S2 S1^(1/2))^(1/2)) via symmetric
    eigen-decompositions (see the module docstring; Heusel et al. 2017). Stable for singular or
    near-singular covariances (N < D samples); the result is clipped at 0.

    Args:
      mu1, mu2: ``(D,)`` means; sigma1, sigma2: ``(D, D)`` covariances; any float dtype.
    Returns:
      The squared distance d^2 as a Python float (>= 0).
    Raises:
      ValueError: shapes that do not fit, different D, non-finite values, a non-symmetric or
        clearly indefinite sigma.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"statistics of {mu1.shape[0]}-d features vs {mu2.shape[0]}-d: "
            "they come from different feature extractors"
        )
    w, v = np.linalg.eigh(sigma1)
    if w[0] < -1e-3 * max(w[-1], 0.0):
        raise ValueError(f"first sigma is not positive semi-definite (eigenvalue {w[0]:.3g})")
    root1 = (v * np.sqrt(_clip_roundoff(w))) @ v.T
    product = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh((product + product.T) / 2)
    if lam[0] < -1e-3 * max(lam[-1], 0.0):
        raise ValueError(f"second sigma is not positive semi-definite (eigenvalue {lam[0]:.3g})")
    tr_covmean = np.sqrt(_clip_roundoff(lam)).sum()
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    return max(float(d2), 0.0)


def inception_meta(info: dict, resize: str, source: str, **extra: Any) -> dict:
    """Metadata for ``save_stats`` from ``load_inception``'s ``info`` and the pipeline.

    Args:
      info: the metadata ``load_inception`` returns (``variant``, ``source_sha256``, ...).
      resize: the resize method passed to ``inception_features``.
      source: what the features were computed on ('CIFAR-10 train, 50000 images', a workdir).
      extra: more JSON-serialisable entries (e.g. ``input_convention='tf'``, ``num_steps=1``).
    """
    return {
        "feature_extractor": FEATURE_EXTRACTOR,
        "weights_variant": info.get("variant"),
        "weights_sha256": info.get("source_sha256"),
        "resize": resize,
        "source": source,
        **extra,
    }


def save_stats(path: str | os.PathLike, mu: Any, sigma: Any, n: int | None, meta: dict) -> Path:
    """Write float64 ``mu``, ``sigma``, ``n`` and ``meta`` (a JSON entry) to an .npz, atomically.

    The arrays are named ``mu`` and ``sigma`` as in pytorch-fid / TTUR / clean-fid files.

    Args:
      path: the output file (parent folders are created).
      mu: ``(D,)``; sigma: ``(D, D)``; n: rows the statistics were computed from.
      meta: JSON-serialisable (``inception_meta``).
    Returns:
      The path written.
    """
    path = Path(path)
    mu, sigma = _check_stats(mu, sigma, f"statistics for {path}")
    meta = {"format": STATS_FORMAT, "format_version": STATS_FORMAT_VERSION, **meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(
            f,
            mu=mu,
            sigma=sigma,
            n=np.array(-1 if n is None else int(n), np.int64),
            **{META_KEY: np.array(json.dumps(meta, sort_keys=True))},
        )
    return path


def load_stats(path: str | os.PathLike) -> StatsTuple:
    """Read statistics written by ``save_stats``, or a foreign file with ``mu`` and ``sigma``.

    pytorch-fid / TTUR / clean-fid reference .npz files hold only ``mu`` and ``sigma``: they load
    with ``n = None`` and empty metadata (``fid_from_stats`` then reports what it cannot check).

    Returns:
      ``(mu (D,) float64, sigma (D, D) float64, n or None, meta)``; ``meta['path']`` is the file.
    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file: not an .npz, no ``mu``/``sigma``, shapes that do not fit,
        non-finite values, unreadable metadata or a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FID statistics at {path}")
    arrays = read_npz(path, "expected FID statistics (mu, sigma), e.g. from `scm-jax fid-stats`")
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(
            f"{path} is not a file of FID statistics: no 'mu' and 'sigma' entries "
            f"(it has {', '.join(sorted(arrays)[:5]) or 'nothing'})"
        )
    meta: dict = {}
    if META_KEY in arrays:
        try:
            meta = json.loads(str(arrays[META_KEY]))
            assert isinstance(meta, dict)
        except (ValueError, AssertionError):
            raise ValueError(f"{path}: unreadable {META_KEY!r} entry") from None
        if int(meta.get("format_version", 0)) > STATS_FORMAT_VERSION:
            raise ValueError(
                f"{path}: statistics format version {meta['format_version']} is newer than this "
                f"scm-jax reads ({STATS_FORMAT_VERSION}); upgrade scm-jax"
            )
    mu, sigma = _check_stats(arrays["mu"], arrays["sigma"], str(path))
    n = int(arrays["n"]) if "n" in arrays and int(arrays["n"]) >= 0 else None
    return mu, sigma, n, {**meta, "path": str(path)}


def compare_meta(meta_a: dict, meta_b: dict) -> list[str]:
    """Differences between two statistics' metadata that make their FID questionable.

    Returns:
      One line per problem: a key of ``COMPARED_KEYS`` that differs or is recorded for only one
      side; or that neither records any (foreign files). Empty when compatible.
    """
    name_a = meta_a.get("path", "first statistics")
    name_b = meta_b.get("path", "second statistics")
    if not any(k in meta_a or k in meta_b for k in COMPARED_KEYS):
        return [
            f"{name_a} and {name_b} record no feature extractor, weights or resize method: "
            "cannot check that their features are comparable"
        ]
    notes = []
    for key in COMPARED_KEYS:
        a, b = meta_a.get(key), meta_b.get(key)
        if a != b:
            notes.append(
                f"{key} differs: {a!r} ({name_a}) vs {b!r} ({name_b}); "
                "FIDs across different feature pipelines are not comparable"
                if a is not None and b is not None
                else f"{key} is {a!r} for {name_a} but {b!r} for {name_b}: cannot check it"
            )
    return notes


def fid_from_stats(
    a: str | os.PathLike | StatsTuple, b: str | os.PathLike | StatsTuple, warn: bool = True
) -> tuple[float, list[str]]:
    """FID between two statistics (files or ``(mu, sigma, n, meta)`` tuples), checked first.

    A different feature dimension is an error; different (or unrecorded) weights, feature
    extractor or resize method, or fewer rows than feature dimensions, are reported: returned
    as notes and, with ``warn``, also issued as ``UserWarning``s.

    Returns:
      ``(fid, notes)``.
    Raises:
      ValueError: naming both sides: feature dimensions differ (or a file is unreadable).
    """
    sides = []
    for name, s in (("first statistics", a), ("second statistics", b)):
        if isinstance(s, str | os.PathLike):
            sides.append(load_stats(s))
        else:
            mu, sigma, n, meta = s
            sides.append((mu, sigma, n, {"path": name, **meta}))
    (mu1, s1, n1, m1), (mu2, s2, n2, m2) = sides
    d1, d2 = np.shape(mu1)[0], np.shape(mu2)[0]
    if d1 != d2:
        raise ValueError(
            f"statistics of {d1}-d features ({m1['path']}) vs {d2}-d ({m2['path']}): "
            "they come from different feature extractors"
        )
    notes = compare_meta(m1, m2)
    for n, meta in ((n1, m1), (n2, m2)):
        if n is not None and n <= d1:
            notes.append(
                f"{meta['path']}: {n} samples for {d1}-d features: the covariance is singular "
                "and the FID is biased upwards (use >= 10k samples; 50k is standard)"
            )
    if warn:
        for note in notes:
            warnings.warn(note, UserWarning, stacklevel=2)
    return frechet_distance(mu1, s1, mu2, s2), notes


__all__ = [
    "COMPARED_KEYS",
    "FEATURE_EXTRACTOR",
    "compare_meta",
    "fid_from_stats",
    "frechet_distance",
    "inception_meta",
    "load_stats",
    "save_stats",
    "stats_from_features",
]
