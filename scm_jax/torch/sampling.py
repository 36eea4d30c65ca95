"""Consistency sampling in PyTorch (``scm_jax.sampling.sample_consistency``, sCM §4).

The noise is an input, ``(steps, B, *shape)`` standard normals: ``noise[0]`` starts the chain at
x = sigma_d noise[0] (t = times[0]), ``noise[i]`` re-noises to ``times[i]`` after step i - 1. The
JAX sampler's draws for a key are :func:`scm_jax.export.stablehlo.consistency_noise`, so both
frameworks give the same samples for the same key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scm_jax.torch.conditioning import batch_values

Tensor = torch.Tensor


def consistency_times(steps: int, t_max: float, t_mid: float = 1.1) -> tuple[float, ...]:
    """``(t_max,)`` for 1 step, ``(t_max, t_mid)`` for 2, then evenly down to t_mid / (n - 1)
    (``scm_jax.sampling.consistency_times``)."""
    from scm_jax.sampling import consistency_times as jax_times

    return jax_times(steps, t_max, t_mid)


def sample_consistency(
    net: nn.Module,
    noise: Tensor,
    times: Sequence[float],
    sigma_d: float,
    labels: Tensor | None = None,
    guidance: Tensor | float | None = None,
) -> Tensor:
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
        raise ValueError(
            f"noise must hold one draw per step: shape ({len(times)}, B, ...), got "
            f"{tuple(noise.shape)}"
        )
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


def decode(x: Tensor, scale: dict[str, Any] | None) -> Tensor:
    """Model units -> data units with an export's ``data_scale`` (``{'mean', 'std', 'sigma_d'}``,
    per channel, channel axis 1 for images ``(B, C, H, W)``, the last for points ``(B, D)``);
    None or empty lists: ``x`` unchanged (``scm_jax.data.scale.DataScale.decode``'s twin)."""
    if not scale or not scale.get("mean"):
        return x
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = torch.as_tensor(scale["mean"], dtype=x.dtype, device=x.device).reshape(shape)
    gain = torch.as_tensor(scale["std"], dtype=x.dtype, device=x.device) / scale["sigma_d"]
    return x * gain.reshape(shape) + mean


class ConsistencySampler(nn.Module):
    """A fixed-step consistency sampler as a module (what the ONNX sampler export traces):
    ``forward(noise, labels=None, guidance=None) -> x0`` in data units (``data_scale``: an
    export's, see :func:`decode`)."""

    def __init__(
        self, net: nn.Module, times: Sequence[float], sigma_d: float,
        data_scale: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.net, self.times, self.sigma_d = net, tuple(float(t) for t in times), float(sigma_d)
        self.data_scale = data_scale

    def forward(
        self, noise: Tensor, labels: Tensor | None = None, guidance: Tensor | None = None
    ) -> Tensor:
        """x0 ``(B, *shape)`` from noise ``(steps, B, *shape)``."""
        x = sample_consistency(self.net, noise, self.times, self.sigma_d, labels, guidance)
        return decode(x, self.data_scale)


class SCMNetwork(nn.Module):
    """Base of :class:`UNet` and :class:`MLP`: TrigFlow constants and the consistency sampler.

    Attributes (set by ``scm_jax.torch.load_network`` from the export's config): ``sigma_d``,
    ``t_max`` (first sampling time, arctan(sigma_max / sigma_d)), ``t_mid`` (2-step middle time),
    ``guidance`` (default guidance input of guidance-input models), ``data_scale`` (model
    units -> data units of the samples, :func:`decode`), ``config``.
    """

    sigma_d: float = 0.5
    t_max: float = math.atan(80.0 / 0.5)
    t_mid: float = 1.1
    guidance: float | None = None
    guidance_input: bool = False
    data_scale: dict[str, Any] | None = None
    config: dict[str, Any] | None = None

    def _default_guidance(self, guidance: Tensor | float | None) -> Tensor | float | None:
        if guidance is None and self.guidance_input:
            return 1.0 if self.guidance is None else self.guidance
        return guidance

    def sample(
        self,
        noise: Tensor,
        steps: int = 2,
        labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:
        """x0 ``(B, *shape)`` in data units (images in [-1, 1], not clipped) by ``steps``-step
        consistency sampling (sCM's t_max, t_mid) from standard-normal ``noise``
        ``(steps, B, *shape)``."""
        times = consistency_times(steps, self.t_max, self.t_mid)
        x = sample_consistency(
            self, noise, times, self.sigma_d, labels, self._default_guidance(guidance)
        )
        return decode(x, self.data_scale)

    def consistency(
        self,
        x_t: Tensor,
        t: Tensor | float,
        labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:
        """f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t / sigma_d, t) (sCM Eq. 5)."""
        t = batch_values(torch.as_tensor(t, dtype=x_t.dtype), x_t.shape[0], x_t.device, "time t")
        F = self(x_t / self.sigma_d, t, labels, self._default_guidance(guidance))
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        return torch.cos(t).reshape(shape) * x_t - torch.sin(t).reshape(shape) * self.sigma_d * F
