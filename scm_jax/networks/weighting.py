"""The learned adaptive weighting head w_phi(t) (EDM2 Eq. 21 / sCM Eq. 8).

It sits beside the network with its own parameters: an embedding of c_noise(t) followed by one
magnitude-preserving linear unit. The objectives use it as (e^{w} / D) * ||...||^2 - w (EDM2's
'logvar' u is -w).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scm_jax.networks.embeddings import StoredFourier, c_noise, time_embedding
from scm_jax.networks.layers import MPConv

Array = jax.Array


class AdaptiveWeight(nn.Module):
    """w_phi(t): ``(B,)`` times -> ``(B,)`` log-weights.

    Attributes:
      channels: width of the time features (EDM2: 128).
      time_embedding, c_noise_mode, c_noise_scale, sigma_d: as in the network.
    """

    channels: int = 128
    time_embedding: str = "positional"
    c_noise_mode: str = "t"
    c_noise_scale: float = 1.0
    sigma_d: float = 0.5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        """Return w_phi(t) with shape ``(B,)`` in at least float32."""
        t = jnp.atleast_1d(jnp.asarray(t))
        if t.ndim != 1 or not jnp.issubdtype(t.dtype, jnp.floating):
            raise ValueError(f"w_phi(t) takes float times of shape (B,), got {t.shape} {t.dtype}")
        c = c_noise(t, self.c_noise_mode, self.sigma_d, self.c_noise_scale)
        if self.time_embedding == "edm2_fourier":
            feats = StoredFourier(self.channels, self.param_dtype, name="fourier")(c)
        else:
            feats = time_embedding(c, self.time_embedding, self.channels)
        return MPConv(1, name="linear", param_dtype=self.param_dtype)(feats)[:, 0]
