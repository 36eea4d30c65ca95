"""PyTorch twins of the magnitude-preserving layers (``scm_jax.networks.layers``), NCHW.

Layouts are PyTorch's: images ``(B, C, H, W)``, vectors ``(B, C)``, convolution weights OIHW
``(C_out, C_in, kh, kw)``, linear weights ``(C_out, C_in)``; every weight is normalised over all
axes but the first (its fan-in), exactly as EDM2's ``MPConv``. Plain tensor math throughout, so
``torch.func.jvp``, ``torch.autocast``, ``torch.compile`` and ``channels_last`` inputs all work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as tnf

Tensor = torch.Tensor

MODULATIONS = ("adn", "mul", "adagn")
_NORM_EPS = 1e-4  # EDM2's epsilon (Eq. 66), as in the JAX layers
_SQRT_FLOOR = 1e-30  # keeps d sqrt(x)/dx finite at x = 0 (forward-mode derivatives)


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms in float32 at least (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize(x: Tensor, dim: int | Sequence[int], eps: float = _NORM_EPS) -> Tensor:
    """x / (eps + ||x|| / sqrt(n)) over ``dim`` (EDM2 Eq. 66), n the number of reduced elements;
    computed in at least float32 and returned in x's dtype."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    n = math.prod([x.shape[d] for d in dims])
    xf = x.to(_norm_dtype(x.dtype))
    norm = torch.sqrt((xf * xf).sum(dim=dims, keepdim=True) + _SQRT_FLOOR)
    return (xf / (eps + norm / math.sqrt(n))).to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """Magnitude-preserving SiLU (EDM2 Eq. 81)."""
    return tnf.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Magnitude-preserving sum (EDM2 Eq. 88)."""
    return (a + t * (b - a)) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Magnitude-preserving concatenation (EDM2 Eq. 103) along ``dim`` (channels)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([(c / math.sqrt(na) * (1 - t)) * a, (c / math.sqrt(nb) * t) * b], dim=dim)


def resample(x: Tensor, mode: str) -> Tensor:
    """EDM2's [1, 1]-filter resampling of ``(B, C, H, W)``: 2x2 mean ('down'), nearest-neighbour
    doubling ('up') or the identity ('keep')."""
    if mode == "keep":
        return x
    if mode == "down":
        return tnf.avg_pool2d(x, 2)
    if mode == "up":
        return tnf.interpolate(x, scale_factor=2.0, mode="nearest")
    raise ValueError(f"unknown resample mode {mode!r}; expected 'keep', 'down' or 'up'")


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel=(k, k)``) or linear layer (``kernel=()``) with
    weight normalisation (EDM2 Eq. 47, 66); parameter ``weight`` ``(C_out, C_in, *kernel)``.

    ``dtype``: computation dtype (None: the input's); weights are normalised in float32.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, ...] = (),
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.fan_in = in_channels * math.prod(kernel)
        self.compute_dtype = dtype

    def forward(self, x: Tensor, gain: Tensor | float = 1.0) -> Tensor:
        """``(B, C_in)`` -> ``(B, C_out)`` or ``(B, C_in, H, W)`` -> ``(B, C_out, H, W)``."""
        w = normalize(self.weight, tuple(range(1, self.weight.ndim)))
        w = w * (gain / math.sqrt(self.fan_in))
        dtype = self.compute_dtype or x.dtype
        w, x = w.to(dtype), x.to(dtype)
        if w.ndim == 2:
            return tnf.linear(x, w)
        return tnf.conv2d(x, w, padding=w.shape[-1] // 2)


def _expand(c: Tensor, like: Tensor) -> Tensor:
    """``(B, C)`` -> broadcastable against ``like`` ``(B, C, ...)``."""
    return c.reshape(*c.shape, *([1] * (like.ndim - 2))).to(like.dtype)


class Modulation(nn.Module):
    """Conditioning of a residual branch: ``'adn'`` (sCM's adaptive double normalisation:
    mp_sum(pnorm(y) pnorm(s(emb)), pnorm(b(emb)))), ``'mul'`` (EDM2: y (1 + g s(emb))) or
    ``'adagn'`` (AdaGN: mp_sum(pnorm(y) s(emb), b(emb)), the ablation of ADN).
    ``y`` is ``(B, C, ...)``, ``emb`` ``(B, C_emb)``."""

    def __init__(
        self, emb_channels: int, channels: int, mode: str = "adn", dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if mode not in MODULATIONS:
            raise ValueError(f"unknown modulation {mode!r}; expected one of {MODULATIONS}")
        self.mode = mode
        if mode == "mul":
            self.emb_gain = nn.Parameter(torch.zeros([]))
            self.emb_linear = MPConv(emb_channels, channels, dtype=dtype)
        else:
            self.emb_scale = MPConv(emb_channels, channels, dtype=dtype)
            self.emb_shift = MPConv(emb_channels, channels, dtype=dtype)

    def forward(self, y: Tensor, emb: Tensor) -> Tensor:
        """The modulated ``y`` (same shape and dtype)."""
        if self.mode == "mul":
            return y * _expand(self.emb_linear(emb, gain=self.emb_gain) + 1, y)
        s, b = self.emb_scale(emb), self.emb_shift(emb)
        if self.mode == "adn":
            s, b = normalize(s, 1), normalize(b, 1)
        return mp_sum(normalize(y, 1) * _expand(s, y), _expand(b, y))
