"""PyTorch twin of the adaptive weighting head w_phi(t) (``scm_jax.networks.weighting``).

c_noise(t), its time features, then one magnitude-preserving linear unit; the objectives use it
as (e^{w} / D) ||...||^2 - w (EDM2 Eq. 21 / sCM Eq. 8). Parameter names follow the Flax tree
(``linear.weight`` ``(1, C)``, ``fourier.freqs`` / ``fourier.phases`` for ``'edm2_fourier'``),
so ``scm_jax.run.state_dict.to_state_dict(params['weight'])`` is its ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from scm_jax.networks.embeddings import TIME_EMBEDDINGS, fourier_constants
from scm_jax.torch.conditioning import (
    StoredFourier,
    _fourier,
    _positional,
    _positional_freqs,
    c_noise,
)
from scm_jax.torch.layers import MPConv

Tensor = torch.Tensor


class AdaptiveWeight(nn.Module):
    """w_phi(t): ``(B,)`` times -> ``(B,)`` log-weights in at least float32.

    Constructor arguments are those of ``scm_jax.networks.AdaptiveWeight`` (``channels``: width
    of the time features, EDM2's 128).
    """

    def __init__(
        self,
        channels: int = 128,
        time_embedding: str = "positional",
        c_noise_mode: str = "t",
        c_noise_scale: float = 1.0,
        sigma_d: float = 0.5,
    ) -> None:
        super().__init__()
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(
                f"unknown time_embedding {time_embedding!r}; expected one of {TIME_EMBEDDINGS}"
            )
        self.time_embedding, self.c_noise_mode = time_embedding, c_noise_mode
        self.c_noise_scale, self.sigma_d = float(c_noise_scale), float(sigma_d)
        if time_embedding == "positional":
            self.register_buffer("pos_freqs", _positional_freqs(channels), persistent=False)
        elif time_embedding == "fourier":
            f0, p0 = (torch.from_numpy(a.astype(np.float32)) for a in fourier_constants(channels))
            self.register_buffer("fourier_freqs", f0, persistent=False)
            self.register_buffer("fourier_phases", p0, persistent=False)
        else:
            self.fourier = StoredFourier(channels)
        self.linear = MPConv(channels, 1)

    def forward(self, t: Tensor) -> Tensor:
        """w_phi(t) ``(B,)`` for float times ``t`` ``(B,)``."""
        if t.ndim != 1 or not t.is_floating_point():
            raise ValueError(f"w_phi(t) takes float times of shape (B,), got {tuple(t.shape)}")
        c = c_noise(t, self.c_noise_mode, self.sigma_d, self.c_noise_scale)
        if self.time_embedding == "positional":
            feats = _positional(c, self.pos_freqs)
        elif self.time_embedding == "fourier":
            feats = _fourier(c, self.fourier_freqs, self.fourier_phases)
        else:
            feats = self.fourier(c)
        return self.linear(feats)[:, 0]


def build_weight_head(model_cfg: Mapping[str, Any]) -> AdaptiveWeight:
    """The weighting head of a config's ``model`` section (as ``scm_jax.networks.build_network``
    builds it beside the network: ``weight_channels`` wide, the network's time embedding)."""
    return AdaptiveWeight(
        channels=int(model_cfg.get("weight_channels", 128)),
        time_embedding=model_cfg.get("time_embedding", "positional"),
        c_noise_mode=model_cfg.get("c_noise_mode", "t"),
        c_noise_scale=float(model_cfg.get("c_noise_scale", 1.0)),
        sigma_d=float(model_cfg.get("sigma_d", 0.5)),
    )
