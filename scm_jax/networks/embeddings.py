"""Time and scalar embeddings: c_noise(t), positional and magnitude-preserving Fourier features.

sCM §4.1 / Eq. 7: the tangent dF/dt contains sin(t) * dF/d(emb) * d(emb)/d(c_noise) * d(c_noise)/dt.
EDM's c_noise = ln(sigma_d tan t) / 4 gives sin(t) d(c_noise)/dt = 1 / (4 cos t), unbounded as
t -> pi/2, and Fourier features with a large scale oscillate; sCM therefore uses c_noise(t) = t
with positional (sinusoidal) embeddings. The stock EDM2 pair stays available for ablations.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

C_NOISE_MODES = ("t", "edm")
TIME_EMBEDDINGS = ("positional", "fourier", "edm2_fourier")
FOURIER_PARAMS = ("freqs", "phases")  # the 1-D parameters of StoredFourier


def c_noise(t: Array, mode: str, sigma_d: float, scale: float = 1.0) -> Array:
    """Noise conditioning of time ``t`` (shape ``(B,)``), computed in at least float32.

    ``'t'``: c_noise = scale * t (sCM; the paper uses scale = 1). ``'edm'``: EDM2's
    ln(sigma_d tan t) / 4, which is -inf at t = 0 and whose tangent diverges at t = pi/2.
    """
    t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
    if mode == "t":
        return scale * t
    if mode == "edm":
        return jnp.log(sigma_d * jnp.tan(t)) / 4
    raise ValueError(f"unknown c_noise mode {mode!r}; expected one of {C_NOISE_MODES}")


def positional_embedding(x: Array, num_channels: int, max_period: float = 10000.0) -> Array:
    """Magnitude-preserving sinusoidal embedding of a scalar per sample.

    sqrt(2) [cos(f_i x), sin(f_i x)] with f_i = max_period^(-i / (C/2)), i < C/2 (Transformer /
    DDPM positional embedding); the sqrt(2) gives unit RMS over channels.

    Args:
      x: ``(B,)`` float.
      num_channels: even number of output channels C.
      max_period: the lowest frequency is 1 / max_period.
    Returns:
      ``(B, C)`` in the dtype of ``x``.
    """
    if num_channels % 2:
        raise ValueError(f"positional embedding needs an even channel count, got {num_channels}")
    half = num_channels // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)
    args = x[:, None] * jnp.asarray(freqs, x.dtype)[None, :]
    return math.sqrt(2) * jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def fourier_constants(
    num_channels: int, bandwidth: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """EDM2's Fourier frequencies 2 pi f, f ~ N(0, bandwidth^2), and phases 2 pi phi,
    phi ~ U[0, 1): numpy float64 ``(C,)`` each, drawn from ``seed``."""
    rng = np.random.RandomState(seed)
    freqs = 2 * np.pi * rng.randn(num_channels) * bandwidth
    phases = 2 * np.pi * rng.rand(num_channels)
    return freqs, phases


def fourier_features(x: Array, freqs: Array, phases: Array) -> Array:
    """sqrt(2) cos(freqs x + phases) (EDM2 Eq. 75): ``(B,)`` x ``(C,)`` -> ``(B, C)``, x's dtype."""
    args = x[:, None] * jnp.asarray(freqs, x.dtype)[None, :] + jnp.asarray(phases, x.dtype)
    return math.sqrt(2) * jnp.cos(args)


def fourier_embedding(x: Array, num_channels: int, bandwidth: float = 1.0, seed: int = 0) -> Array:
    """EDM2's magnitude-preserving Fourier features (EDM2 Eq. 75): sqrt(2) cos(2 pi (f x + phi)).

    Frequencies f ~ N(0, bandwidth^2) and phases phi ~ U[0, 1) are fixed constants drawn from
    ``seed`` (:func:`fourier_constants`; here they are part of the function).

    Args:
      x: ``(B,)`` float.
      num_channels: output channels C.
    Returns:
      ``(B, C)`` in the dtype of ``x``.
    """
    return fourier_features(x, *fourier_constants(num_channels, bandwidth, seed))


class StoredFourier(nn.Module):
    """Fourier features whose frequencies and phases are parameters (EDM2's ``MPFourier``).

    Parameters ``freqs`` and ``phases`` ``(C,)`` start at :func:`fourier_constants` (the draw of
    ``'fourier'``) and never train (a stop-gradient): an imported EDM2 model brings its own.
    ``(B,)`` -> ``(B, C)`` in the dtype of the input.
    """

    num_channels: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Return sqrt(2) cos(freqs x + phases) ``(B, C)``."""
        f0, p0 = fourier_constants(self.num_channels)
        init = lambda v: lambda key, shape, dtype: jnp.asarray(v, dtype)  # noqa: E731
        freqs = self.param("freqs", init(f0), (self.num_channels,), self.param_dtype)
        phases = self.param("phases", init(p0), (self.num_channels,), self.param_dtype)
        return fourier_features(x, jax.lax.stop_gradient(freqs), jax.lax.stop_gradient(phases))


def time_embedding(x: Array, kind: str, num_channels: int) -> Array:
    """Embed ``(B,)`` as ``(B, C)``: :func:`positional_embedding` or :func:`fourier_embedding`
    (``'edm2_fourier'`` has parameters: use :class:`StoredFourier`)."""
    if kind == "positional":
        return positional_embedding(x, num_channels)
    if kind == "fourier":
        return fourier_embedding(x, num_channels)
    if kind == "edm2_fourier":
        raise ValueError("'edm2_fourier' features are parameters: use the StoredFourier module")
    raise ValueError(f"unknown time embedding {kind!r}; expected one of {TIME_EMBEDDINGS}")
