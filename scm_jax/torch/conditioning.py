"""PyTorch twin of the conditioning vector (``scm_jax.networks.conditioning``, ``embeddings``):
c_noise(t), positional / Fourier / stored-Fourier features, guidance scale and class label."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from scm_jax.networks.embeddings import fourier_constants
from scm_jax.torch.layers import MPConv, mp_silu, mp_sum

Tensor = torch.Tensor


def _positional_freqs(num_channels: int, max_period: float = 10000.0) -> torch.Tensor:
    """The frequencies of ``scm_jax.networks.embeddings.positional_embedding`` (float32)."""
    half = num_channels // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)
    return torch.from_numpy(freqs.astype(np.float32))


def _positional(x: Tensor, freqs: Tensor) -> Tensor:
    args = x[:, None] * freqs.to(x.dtype)[None, :]
    return math.sqrt(2) * torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _fourier(x: Tensor, freqs: Tensor, phases: Tensor) -> Tensor:
    args = x[:, None] * freqs.to(x.dtype)[None, :] + phases.to(x.dtype)
    return math.sqrt(2) * torch.cos(args)


def c_noise(t: Tensor, mode: str, sigma_d: float, scale: float = 1.0) -> Tensor:
    """c_noise(t) in at least float32: ``scale * t`` (mode ``'t'``) or EDM's ln(sigma_d tan t) / 4
    (``'edm'``), as ``scm_jax.networks.embeddings.c_noise``."""
    t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    if mode == "t":
        return scale * t
    return torch.log(sigma_d * torch.tan(t)) / 4


def batch_values(v: Tensor | float, batch: int, device: Any, name: str) -> Tensor:
    """A scalar or ``(B,)`` float (time, guidance scale) as a float ``(B,)`` tensor."""
    v = torch.as_tensor(v, device=device)
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got dtype {v.dtype}")
    if v.ndim == 0:
        return v.expand(batch)
    if v.ndim != 1:
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(v.shape)}")
    return v


class StoredFourier(nn.Module):
    """EDM2's ``MPFourier``: buffers ``freqs``, ``phases`` ``(C,)`` (the ``'edm2_fourier'``
    embedding; they start at the JAX draw and come with the weights)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        f0, p0 = fourier_constants(num_channels)
        self.register_buffer("freqs", torch.from_numpy(f0.astype(np.float32)))
        self.register_buffer("phases", torch.from_numpy(p0.astype(np.float32)))

    def forward(self, x: Tensor) -> Tensor:
        """``(B,)`` -> ``(B, C)``."""
        return _fourier(x, self.freqs, self.phases)


class ConditionEmbedding(nn.Module):
    """(t, labels, guidance) -> the ``(B, emb_channels)`` conditioning vector
    (``scm_jax.networks.conditioning.ConditionEmbedding``)."""

    def __init__(
        self,
        noise_channels: int,
        emb_channels: int,
        num_classes: int = 0,
        guidance_input: bool = False,
        label_dropout: float = 0.0,
        time_embedding: str = "positional",
        c_noise_mode: str = "t",
        c_noise_scale: float = 1.0,
        sigma_d: float = 0.5,
        label_balance: float = 0.5,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_classes, self.guidance_input = int(num_classes), bool(guidance_input)
        self.label_dropout, self.label_balance = float(label_dropout), float(label_balance)
        self.time_embedding, self.c_noise_mode = time_embedding, c_noise_mode
        self.c_noise_scale, self.sigma_d = float(c_noise_scale), float(sigma_d)
        if time_embedding == "positional" or guidance_input:
            self.register_buffer("pos_freqs", _positional_freqs(noise_channels), persistent=False)
        if time_embedding == "fourier":
            f0, p0 = fourier_constants(noise_channels)
            self.register_buffer(
                "fourier_freqs", torch.from_numpy(f0.astype(np.float32)), persistent=False
            )
            self.register_buffer(
                "fourier_phases", torch.from_numpy(p0.astype(np.float32)), persistent=False
            )
        elif time_embedding == "edm2_fourier":
            self.emb_fourier = StoredFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, dtype=dtype)
        if guidance_input:
            self.emb_guidance = MPConv(noise_channels, emb_channels, dtype=dtype)
        if num_classes:
            self.emb_label = MPConv(num_classes, emb_channels, dtype=dtype)

    def c_noise(self, t: Tensor) -> Tensor:
        """c_noise(t) in at least float32 (:func:`c_noise`)."""
        return c_noise(t, self.c_noise_mode, self.sigma_d, self.c_noise_scale)

    def label_vectors(self, labels: Tensor | None, batch: int, like: Tensor) -> Tensor:
        """``(B, K)`` float vectors of int labels (-1 = null), one-hot/soft floats, or None."""
        k = self.num_classes
        if labels is None:
            return like.new_zeros((batch, k))
        labels = torch.as_tensor(labels, device=like.device)
        if not labels.is_floating_point():
            if labels.shape != (batch,):
                raise ValueError(
                    f"integer labels must have shape ({batch},), got {tuple(labels.shape)}"
                )
            classes = torch.arange(k, device=like.device)
            return (labels[:, None] == classes[None, :]).to(like.dtype)  # -1 -> all zeros
        if labels.shape != (batch, k):
            raise ValueError(
                f"float labels must have shape ({batch}, {k}), got {tuple(labels.shape)}"
            )
        return labels.to(like.dtype)

    def forward(self, t: Tensor, labels: Tensor | None, guidance: Tensor | None) -> Tensor:
        """The embedding ``(B, emb_channels)``; ``t`` is ``(B,)``."""
        batch = t.shape[0]
        c = self.c_noise(t)
        if self.time_embedding == "positional":
            feats = _positional(c, self.pos_freqs)
        elif self.time_embedding == "fourier":
            feats = _fourier(c, self.fourier_freqs, self.fourier_phases)
        else:
            feats = self.emb_fourier(c)
        emb = self.emb_noise(feats)
        if self.guidance_input:
            if guidance is None:
                raise ValueError(
                    "this network takes a guidance scale: pass guidance= of shape "
                    "(B,) (1.0 means no guidance)"
                )
            s = batch_values(guidance, batch, t.device, "guidance").to(c.dtype)
            emb = mp_sum(emb, self.emb_guidance(_positional(s, self.pos_freqs)), t=0.5)
        elif guidance is not None:
            raise ValueError("guidance was given but this network has no guidance input")
        if self.num_classes:
            onehot = self.label_vectors(labels, batch, c)
            if self.training and self.label_dropout > 0:
                keep = torch.rand(batch, device=c.device) >= self.label_dropout
                onehot = onehot * keep[:, None].to(onehot.dtype)
            y = self.emb_label(onehot * math.sqrt(self.num_classes))
            emb = mp_sum(emb, y, t=self.label_balance)
        elif labels is not None:
            raise ValueError("labels were given but this network is unconditional (num_classes=0)")
        return mp_silu(emb)
