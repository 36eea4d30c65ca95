"""Consistency sampling in PyTorch (``scm_jax.sampling.sample_consistency``, sCM §4).

The noise is an input, ``(steps, B, *shape)`` standard normals: ``noise[0]`` starts the chain at
x = sigma_d noise[0] (t = times[0]), ``noise[i]`` re-noises to ``times[i]`` after step i - 1. The
JAX sampler's draws for a key are :func:`scm_jax.export.stablehlo.consistency_noise`, so both
frameworks give the same samples for the same key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

Tensor = torch.Tensor


def consistency_times(steps: int, t_max: float, t_mid: float = 1.1) -> tuple[float, ...]:
    """``(t_max,)`` for 1 step, ``(t_max, t_mid)`` for 2, then evenly down to t_mid / (n - 1)
    (``scm_jax.sampling.consistency_times``)."""
    from scm_jax.sampling import consistency_times as jax_times

    return jax_times(steps, t_max, t_mid)


def sample_consistency(
    net: nn.Module, noise: Tensor, times: Sequence[float], sigma_d: float,
    labels: Tensor | None = None, guidance: Tensor | float | None = None,
) -> Tensor:  # fmt: skip
    """Multistep consistency sampling with the given noise.

    Args:
      net: F_theta (``forward(x_scaled, t, labels, guidance)``).
      noise: ``(len(times), B, *shape)`` standard normal.
      times: strictly decreasing times in (0, pi/2].
      sigma_d: data std.
      labels, guidance: passed to ``net`` (guidance broadcast to ``(B,)``).
    Returns:
      x0 ``(B, *shape)`` in noise's dtype (not clipped).
    """
    if noise.shape[0] != len(times):
        raise ValueError(f"noise must hold one draw per step: shape ({len(times)}, B, ...), got "
                         f"{tuple(noise.shape)}")  # fmt: skip
    b = noise.shape[1]
    if guidance is not None:
        guidance = torch.as_tensor(guidance, dtype=noise.dtype, device=noise.device).expand(b)
    x = sigma_d * noise[0]
    for i, t in enumerate(times):
        tb = torch.full((b,), t, dtype=noise.dtype, device=noise.device)
        F = net(x / sigma_d, tb, labels, guidance)
        x = math.cos(t) * x - math.sin(t) * sigma_d * F  # f(x_t, t), sCM Eq. 5
        if i + 1 < len(times):
            t_n = times[i + 1]
            x = math.cos(t_n) * x + math.sin(t_n) * sigma_d * noise[i + 1]
    return x


class ConsistencySampler(nn.Module):
    """A fixed-step consistency sampler as a module (what the ONNX sampler export traces):
    ``forward(noise, labels=None, guidance=None) -> x0``."""

    def __init__(self, net: nn.Module, times: Sequence[float], sigma_d: float) -> None:
        super().__init__()
        self.net, self.times, self.sigma_d = net, tuple(float(t) for t in times), float(sigma_d)

    def forward(
        self, noise: Tensor, labels: Tensor | None = None, guidance: Tensor | None = None
    ) -> Tensor:
        """x0 ``(B, *shape)`` from noise ``(steps, B, *shape)``."""
        return sample_consistency(self.net, noise, self.times, self.sigma_d, labels, guidance)
