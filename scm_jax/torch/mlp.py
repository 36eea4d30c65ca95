"""PyTorch twin of the toy MP-MLP (``scm_jax.networks.mlp``)."""

from __future__ import annotations

import torch
from torch import nn

from scm_jax.torch.conditioning import ConditionEmbedding, batch_values
from scm_jax.torch.layers import Modulation, MPConv, mp_silu, mp_sum
from scm_jax.torch.sampling import SCMNetwork

Tensor = torch.Tensor


class MLP(SCMNetwork):
    """The toy residual MP-MLP (``scm_jax.networks.MLPNet``): ``(B, D)`` -> F ``(B, D)``."""

    def __init__(
        self,
        data_dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        emb_channels: int = 128,
        num_classes: int = 0,
        guidance_input: bool = False,
        label_dropout: float = 0.0,
        dropout: float = 0.0,
        time_embedding: str = "positional",
        c_noise_mode: str = "t",
        c_noise_scale: float = 1.0,
        modulation: str = "adn",
        sigma_d: float = 0.5,
        res_balance: float = 0.3,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from scm_jax.networks.conditioning import check_conditioning_args

        check_conditioning_args(modulation, time_embedding, c_noise_mode, dropout, label_dropout)
        self.data_dim, self.depth, self.dropout = data_dim, depth, float(dropout)
        self.sigma_d = sigma_d
        self.num_classes, self.guidance_input = num_classes, guidance_input
        self.res_balance = res_balance
        self.cond = ConditionEmbedding(
            emb_channels,
            emb_channels,
            num_classes,
            guidance_input,
            label_dropout,
            time_embedding,
            c_noise_mode,
            c_noise_scale,
            sigma_d,
            0.5,
            dtype,
        )
        self.in_linear = MPConv(data_dim + 1, hidden, dtype=dtype)
        for i in range(depth):
            self.add_module(f"block{i}_linear0", MPConv(hidden, hidden, dtype=dtype))
            self.add_module(f"block{i}_mod", Modulation(emb_channels, hidden, modulation, dtype))
            self.add_module(f"block{i}_linear1", MPConv(hidden, hidden, dtype=dtype))
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.out_linear = MPConv(hidden, data_dim, dtype=dtype)

    def forward(
        self,
        x_scaled: Tensor,
        t: Tensor | float,
        labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:
        """F_theta on ``(B, D)`` (arguments as :meth:`UNet.forward`)."""
        if x_scaled.ndim != 2 or x_scaled.shape[1] != self.data_dim:
            raise ValueError(
                f"expected input of shape (B, {self.data_dim}), got {tuple(x_scaled.shape)}"
            )
        t = batch_values(t, x_scaled.shape[0], x_scaled.device, "time t")
        emb = self.cond(t, labels, guidance)
        h = self.in_linear(torch.cat([x_scaled, torch.ones_like(x_scaled[:, :1])], dim=1))
        for i in range(self.depth):
            y = getattr(self, f"block{i}_linear0")(mp_silu(h))
            y = mp_silu(getattr(self, f"block{i}_mod")(y, emb))
            if self.training and self.dropout > 0:
                y = nn.functional.dropout(y, p=self.dropout)
            y = getattr(self, f"block{i}_linear1")(y)
            h = mp_sum(h, y, t=self.res_balance)
        return self.out_linear(mp_silu(h), gain=self.out_gain).to(x_scaled.dtype)
