"""A small magnitude-preserving MLP network for 2-D (or any vector) toy data.

Same conditioning and interface as the U-Net: F_theta(x / sigma_d, t, labels, guidance), with
residual blocks of MP linear layers modulated by the embedding (ADN, EDM2's multiplicative
form or AdaGN), so that toy experiments exercise the same stabilisers as the image models.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scm_jax.networks.conditioning import ConditionEmbedding, batch_times, check_conditioning_args
from scm_jax.networks.layers import Modulation, MPConv, mp_silu, mp_sum

Array = jax.Array
Dtype = Any


class MLPNet(nn.Module):
    """Residual MP-MLP: input ``(B, data_dim)`` -> F ``(B, data_dim)``.

    Attributes:
      data_dim: dimension D of a sample.
      hidden: width of the residual stream.
      depth: number of residual blocks.
      emb_channels: width of the conditioning embedding.
      num_classes, guidance_input, label_dropout, dropout, time_embedding, c_noise_mode,
      c_noise_scale, modulation, sigma_d: as in ``EDM2UNet``.
    """

    data_dim: int = 2
    hidden: int = 256
    depth: int = 4
    emb_channels: int = 128
    num_classes: int = 0
    guidance_input: bool = False
    label_dropout: float = 0.0
    dropout: float = 0.0
    time_embedding: str = "positional"
    c_noise_mode: str = "t"
    c_noise_scale: float = 1.0
    modulation: str = "adn"
    sigma_d: float = 0.5
    res_balance: float = 0.3
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.data_dim < 1 or self.hidden < 2 or self.depth < 1 or self.emb_channels < 2:
            raise ValueError(
                f"MLPNet needs data_dim >= 1, hidden >= 2, depth >= 1, emb_channels >= 2; got "
                f"{self.data_dim}, {self.hidden}, {self.depth}, {self.emb_channels}"
            )
        check_conditioning_args(
            self.modulation,
            self.time_embedding,
            self.c_noise_mode,
            self.dropout,
            self.label_dropout,
        )
        super().__post_init__()

    def check_input(self, x: Array) -> None:
        """Raise if ``x`` is not a float ``(B, data_dim)`` array."""
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"expected input of shape (B, {self.data_dim}), got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"expected a float input (x_t / sigma_d), got dtype {x.dtype}")

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array | float,
        labels: Array | None = None,
        guidance: Array | None = None,
        train: bool = False,
    ) -> Array:
        """Compute F_theta; arguments as in ``EDM2UNet.__call__`` with ``x`` of shape ``(B, D)``."""
        self.check_input(x)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        t = batch_times(t, x.shape[0])
        emb = ConditionEmbedding(
            noise_channels=self.emb_channels, emb_channels=self.emb_channels,
            num_classes=self.num_classes, guidance_input=self.guidance_input,
            label_dropout=self.label_dropout, time_embedding=self.time_embedding,
            c_noise_mode=self.c_noise_mode, c_noise_scale=self.c_noise_scale,
            sigma_d=self.sigma_d, name="cond", **kw,
        )(t, labels, guidance, train)  # fmt: skip
        h = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=-1)
        h = MPConv(self.hidden, name="in_linear", **kw)(h)
        for i in range(self.depth):
            y = MPConv(self.hidden, name=f"block{i}_linear0", **kw)(mp_silu(h))
            y = mp_silu(
                Modulation(self.hidden, self.modulation, name=f"block{i}_mod", **kw)(y, emb)
            )
            if train and self.dropout > 0:
                y = nn.Dropout(self.dropout)(y, deterministic=False)
            y = MPConv(self.hidden, name=f"block{i}_linear1", **kw)(y)
            h = mp_sum(h, y, t=self.res_balance)
        out_gain = self.param("out_gain", nn.initializers.zeros, (), self.param_dtype)
        F = MPConv(self.data_dim, name="out_linear", **kw)(mp_silu(h), gain=out_gain)
        return F.astype(x.dtype)
