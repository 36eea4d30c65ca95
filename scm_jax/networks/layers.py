"""Magnitude-preserving building blocks of the EDM2 network (Karras et al. 2024, config G).

Every function here is JVP-safe: plain jnp math or a custom_jvp (never a custom_vjp). Norms
are computed in at least float32 and with a tiny floor inside the square root, so that
forward-mode derivatives stay finite for exactly-zero vectors (a zero one-hot label, for example).

Layout is channels-last: images ``(B, H, W, C)``, vectors ``(B, C)``. Convolution kernels are
stored HWIO ``(kh, kw, C_in, C_out)`` and linear weights ``(C_in, C_out)``; every weight named
``weight`` is normalised over all axes but the last (its fan-in).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

MODULATIONS = ("adn", "mul", "adagn")
_NORM_EPS = 1e-4  # EDM2's epsilon in normalize() (Eq. 66 and the pixel norm)
_SQRT_FLOOR = 1e-30  # keeps d sqrt(x)/dx finite at x = 0; far below any real activation energy


def _norm_dtype(dtype: Dtype) -> Dtype:
    """Compute norms in float32 at least (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def normalize(x: Array, axis: int | Sequence[int] | None = None, eps: float = _NORM_EPS) -> Array:
    """Scale ``x`` to unit RMS over ``axis`` (EDM2's ``normalize``, Eq. 66).

    x / (eps + ||x|| / sqrt(n)), where n is the number of elements reduced over. With ``axis=None``
    all axes but the last are reduced (the fan-in of a weight stored ``(..., C_in, C_out)``).

    Args:
      x: any float array.
      axis: axes to reduce; default all but the last.
      eps: the additive epsilon of EDM2.
    Returns:
      An array of the shape and dtype of ``x``.
    """
    if axis is None:
        axis = tuple(range(x.ndim - 1))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    n = math.prod(x.shape[a] for a in axes)
    xf = x.astype(_norm_dtype(x.dtype))
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=axes, keepdims=True) + _SQRT_FLOOR)
    return (xf / (eps + norm / math.sqrt(n))).astype(x.dtype)


def pixel_norm(x: Array, eps: float = _NORM_EPS) -> Array:
    """Pixel normalisation: unit RMS over the channel (last) axis, per pixel / per sample."""
    return normalize(x, axis=-1, eps=eps)


def mp_silu(x: Array) -> Array:
    """Magnitude-preserving SiLU (EDM2 Eq. 81): silu(x) / 0.596."""
    return jax.nn.silu(x) / 0.596


def mp_sum(a: Array, b: Array, t: float = 0.5) -> Array:
    """Magnitude-preserving sum (EDM2 Eq. 88): lerp(a, b, t) / sqrt((1 - t)^2 + t^2)."""
    return (a + t * (b - a)) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Array, b: Array, t: float = 0.5) -> Array:
    """Magnitude-preserving concatenation along the channel axis (EDM2 Eq. 103)."""
    na, nb = a.shape[-1], b.shape[-1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return jnp.concatenate([wa * a, wb * b], axis=-1)


def resample(x: Array, mode: str) -> Array:
    """EDM2 resampling with the [1, 1] filter on ``(B, H, W, C)``.

    ``'down'`` is 2x2 average pooling with stride 2, ``'up'`` nearest-neighbour doubling, ``'keep'``
    the identity: exactly EDM2's depthwise (transposed) convolutions with that filter.
    """
    if mode == "keep":
        return x
    b, h, w, c = x.shape
    if mode == "down":
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    if mode == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    raise ValueError(f"unknown resample mode {mode!r}; expected 'keep', 'down' or 'up'")


def project_weights(params: Any) -> Any:
    """Forced weight normalisation (EDM2 Eq. 66) as a pure, idempotent projection of a tree.

    Every leaf named ``weight`` with at least 2 dimensions is rescaled to exactly unit RMS per
    output channel (over all axes but the last); everything else (gains) is returned unchanged.
    Apply it after each optimiser update. Unlike EDM2's in-place ``normalize`` (whose epsilon
    shrinks the weight by ~1e-4 per call), this projection is idempotent: projecting twice equals
    projecting once, to float rounding. The forward pass normalises again (with EDM2's epsilon),
    so the projection changes the network's function only through that epsilon (~1e-4 relative
    per layer).

    Args:
      params: a pytree of arrays (for example ``{'net': ..., 'weight': ...}``).
    Returns:
      A pytree with the same structure, shapes and dtypes.
    """

    def proj(path, leaf):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        if name != "weight" or jnp.ndim(leaf) < 2:
            return leaf
        axes = tuple(range(leaf.ndim - 1))
        lf = leaf.astype(_norm_dtype(leaf.dtype))
        rms = jnp.sqrt(jnp.mean(lf * lf, axis=axes, keepdims=True))
        return (lf / jnp.maximum(rms, jnp.finfo(lf.dtype).tiny)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(proj, params)


def _conv_xla(x: Array, w: Array) -> Array:
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _shifted_patches(x: Array, kh: int, kw: int) -> Array:
    """``(B, H, W, kh kw C)``: the 'same'-padded neighbourhoods of x, (i, j, c) order."""
    ph, pw = kh // 2, kw // 2
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    return jnp.concatenate(
        [xp[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1
    )


@jax.custom_jvp
def _conv_matmul_dw(x: Array, w: Array) -> Array:
    return _conv_xla(x, w)


@functools.partial(_conv_matmul_dw.defjvp, symbolic_zeros=True)
def _conv_matmul_dw_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _conv_xla(x, w)
    dy = jnp.zeros_like(y)
    if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
        dy = dy + _conv_xla(dx, w)
    if not isinstance(dw, jax.custom_derivatives.SymbolicZero):
        kh, kw, c_in, c_out = w.shape
        dy = dy + _shifted_patches(x, kh, kw) @ dw.reshape(kh * kw * c_in, c_out)
    return y, dy


# 'auto' differentiates the weight through the patch matrix on CPUs from this many output
# positions (batch x height x width) up: below it XLA:CPU's own weight gradient is faster, above
# it XLA's falls off a cliff (benchmarks/results/cpu_conv.json, docs/performance.md).
MATMUL_DW_MIN_POSITIONS = 65_536


def conv2d_same(x: Array, w: Array, impl: str = "auto") -> Array:
    """'same'-padded stride-1 convolution, NHWC x HWIO -> NHWC.

    ``impl='xla'`` is ``lax.conv_general_dilated`` throughout. ``'matmul_dw'`` computes the same
    function but differentiates the weight through an explicit patch matrix, so the weight
    gradient is one matmul: on large inputs XLA:CPU's native weight-gradient convolution costs
    ~10 forward passes; on GPUs the native one is fast and needs no patch matrix. ``'auto'``
    picks ``'matmul_dw'`` on the CPU backend for inputs with at least
    :data:`MATMUL_DW_MIN_POSITIONS` output positions, ``'xla'`` otherwise.
    """
    if impl == "auto":
        # A symbolic batch (jax.export) has no size to compare: 'xla' (same forward values).
        static = all(isinstance(d, int) for d in x.shape[:3])
        positions = x.shape[0] * x.shape[1] * x.shape[2] if static else 0
        on_cpu = jax.default_backend() == "cpu"
        impl = "matmul_dw" if on_cpu and positions >= MATMUL_DW_MIN_POSITIONS else "xla"
    if impl == "xla":
        return _conv_xla(x, w)
    if impl == "matmul_dw":
        return _conv_matmul_dw(x, w)
    raise ValueError(f"unknown conv impl {impl!r}; expected 'auto', 'xla' or 'matmul_dw'")


class MPConv(nn.Module):
    """Magnitude-preserving convolution or linear layer with weight normalisation (EDM2 Eq. 47, 66).

    The stored weight is normalised in every forward pass and scaled by gain / sqrt(fan_in), so a
    unit-variance input gives a unit-variance output at any weight magnitude. ``kernel_size=()``
    makes it a linear layer on ``(B, C_in)``; ``(k, k)`` a 'same'-padded convolution on
    ``(B, H, W, C_in)``.

    Attributes:
      features: output channels C_out.
      kernel_size: ``()`` or ``(kh, kw)`` (odd sizes).
      dtype: computation dtype (None: the input's).
      param_dtype: storage dtype of the weight.
    """

    features: int
    kernel_size: tuple[int, ...] = ()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, gain: Array | float = 1.0) -> Array:
        """Apply the layer; ``gain`` is a scalar multiplier of the normalised weight."""
        c_in = x.shape[-1]
        shape = (*self.kernel_size, c_in, self.features)
        w = self.param("weight", nn.initializers.normal(stddev=1.0), shape, self.param_dtype)
        fan_in = math.prod(shape[:-1])
        dtype = self.dtype or x.dtype
        w = normalize(w) * (gain / math.sqrt(fan_in))
        w = w.astype(dtype)
        x = x.astype(dtype)
        if not self.kernel_size:
            return x @ w
        return conv2d_same(x, w)


class Modulation(nn.Module):
    """Conditioning of a residual branch by the embedding (one of three forms).

    * ``'adn'``: adaptive double normalisation (sCM §4.1):
      y = mp_sum(pnorm(y) * pnorm(s(emb)), pnorm(b(emb))), with s and b magnitude-preserving
      linear maps. The paper writes norm(x) * pnorm(s) + pnorm(b); the mp_sum (a division by
      sqrt 2) keeps unit magnitude, in the spirit of EDM2. Adds one C_emb x C_out projection
      (the shift) per block over stock EDM2.
    * ``'mul'``: stock EDM2 multiplicative modulation y * (1 + g * s(emb)), learned gain g = 0
      at initialisation.
    * ``'adagn'``: AdaGN, the modulation ADN replaces (sCM §4.1; iCT's, which made consistency
      training diverge there): y = mp_sum(pnorm(y) * s(emb), b(emb)), i.e. ``'adn'`` without
      the pixel normalisation of s and b, whose magnitudes then follow the embedding (for the
      ablation; same parameters as ``'adn'``).

    Input ``y`` is ``(B, ..., C)`` and ``emb`` is ``(B, C_emb)``.
    """

    features: int
    mode: str = "adn"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: Array, emb: Array) -> Array:
        """Return the modulated ``y`` (same shape and dtype)."""
        expand = (slice(None),) + (None,) * (y.ndim - 2) + (slice(None),)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if self.mode == "mul":
            gain = self.param("emb_gain", nn.initializers.zeros, (), self.param_dtype)
            c = MPConv(self.features, name="emb_linear", **kw)(emb, gain=gain) + 1
            return y * c[expand].astype(y.dtype)
        if self.mode in ("adn", "adagn"):
            s = MPConv(self.features, name="emb_scale", **kw)(emb)
            b = MPConv(self.features, name="emb_shift", **kw)(emb)
            if self.mode == "adn":
                s, b = pixel_norm(s), pixel_norm(b)
            return mp_sum(pixel_norm(y) * s[expand].astype(y.dtype), b[expand].astype(y.dtype))
        raise ValueError(f"unknown modulation {self.mode!r}; expected one of {MODULATIONS}")
