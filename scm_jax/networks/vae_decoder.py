"""The Stable Diffusion VAE decoder (``stabilityai/sd-vae-ft-mse``) in Flax, for timing.

ImageNet-512 models (EDM2, sCM) generate 64x64x4 SD-VAE latents; an image needs one pass of
this decoder. :class:`SDVAEDecoder` has the architecture and size of diffusers'
``AutoencoderKL`` decoder with the sd-vae-ft-mse settings (49.49 M parameters with
``post_quant_conv``): a 1x1 ``post_quant_conv`` (4 -> 4), a 3x3 ``conv_in`` (4 -> 512), a
mid block (ResNet, single-head self-attention over all latent positions, ResNet), four up
blocks of 512, 512, 256 and 128 channels with three ResNet blocks each and a nearest-neighbour
2x upsampler + 3x3 convolution after each of the first three, then GroupNorm, SiLU and a 3x3
``conv_out`` to RGB. GroupNorm has 32 groups (epsilon 1e-6); ResNet blocks are
GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3 with a 1x1 shortcut where the
channel count changes. Parameter names follow diffusers' module names.

**Random weights: timing only.** Nothing here loads the released weights (they are not
available offline); :func:`init_random` draws them. The module is what ``benchmarks/
sampling.py`` times for "a 2-step sample with VAE decoding"; its images are noise. Input:
*raw* latents (the encoder's output, before any normalisation; EDM2 and ``configs/
imagenet512.py`` normalise them with per-channel statistics, see :func:`raw_latents`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

__all__ = ["SDVAEDecoder", "init_random", "raw_latents"]


class _GroupNorm(nn.Module):
    """GroupNorm with statistics in float32 whatever the compute dtype."""

    groups: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.GroupNorm(num_groups=self.groups, epsilon=1e-6, dtype=jnp.float32,
                            param_dtype=self.param_dtype, name="norm")(x).astype(
            self.dtype or x.dtype)  # fmt: skip


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without a time embedding: ``(B, H, W, C_in) -> (B, H, W, C)``."""

    out_channels: int
    groups: int = 32
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.silu(_GroupNorm(self.groups, name="norm1", **kw)(x))
        h = nn.Conv(self.out_channels, (3, 3), padding="SAME", name="conv1", **kw)(h)
        h = nn.silu(_GroupNorm(self.groups, name="norm2", **kw)(h))
        h = nn.Conv(self.out_channels, (3, 3), padding="SAME", name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut", **kw)(x)
        return x.astype(h.dtype) + h


class AttentionBlock(nn.Module):
    """diffusers' VAE ``Attention``: GroupNorm, one head over all H x W positions, residual."""

    groups: int = 32
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        b, h, w, c = x.shape
        y = _GroupNorm(self.groups, name="group_norm", **kw)(x).reshape(b, h * w, c)
        q = nn.Dense(c, name="to_q", **kw)(y)
        k = nn.Dense(c, name="to_k", **kw)(y)
        v = nn.Dense(c, name="to_v", **kw)(y)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = nn.Dense(c, name="to_out", **kw)(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x.astype(y.dtype) + y.reshape(b, h, w, c)


class SDVAEDecoder(nn.Module):
    """The SD-VAE decoder: raw latents ``(B, h, w, 4)`` -> images ``(B, 8h, 8w, 3)``, NHWC.

    Attributes:
      latent_channels, out_channels: 4 and 3.
      block_out_channels: diffusers' ``block_out_channels`` (encoder order); the up blocks use
        them reversed: 512, 512, 256, 128.
      layers_per_block: 2 (each up block has ``layers_per_block + 1`` ResNet blocks).
      groups: GroupNorm groups (32).
      dtype: compute dtype (None: the input's); param_dtype: storage dtype.
    """

    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    groups: int = 32
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        """Decode raw latents; returns images in the compute dtype (about [-1, 1] once
        trained; not clipped)."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        gkw = {"groups": self.groups, **kw}
        chans = tuple(reversed(self.block_out_channels))
        z = nn.Conv(self.latent_channels, (1, 1), name="post_quant_conv", **kw)(z)
        h = nn.Conv(chans[0], (3, 3), padding="SAME", name="conv_in", **kw)(z)
        h = ResnetBlock(chans[0], name="mid_block_resnets_0", **gkw)(h)
        h = AttentionBlock(name="mid_block_attentions_0", **gkw)(h)
        h = ResnetBlock(chans[0], name="mid_block_resnets_1", **gkw)(h)
        for i, c in enumerate(chans):
            for j in range(self.layers_per_block + 1):
                h = ResnetBlock(c, name=f"up_blocks_{i}_resnets_{j}", **gkw)(h)
            if i < len(chans) - 1:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest, x2
                h = nn.Conv(c, (3, 3), padding="SAME", name=f"up_blocks_{i}_upsamplers_0",
                            **kw)(h)  # fmt: skip
        h = nn.silu(_GroupNorm(self.groups, name="conv_norm_out", **kw)(h))
        return nn.Conv(self.out_channels, (3, 3), padding="SAME", name="conv_out", **kw)(h)


def init_random(decoder: SDVAEDecoder, key: Array, latent_hw: int = 64) -> Any:
    """Random parameters of ``decoder`` (flax's default initialisers; timing only).

    Args:
      decoder: the module; key: a PRNG key; latent_hw: latent height = width used to trace it.
    Returns:
      ``{'params': ...}`` (the variables ``decoder.apply`` takes).
    """
    z = jnp.zeros((1, latent_hw, latent_hw, decoder.latent_channels), jnp.float32)
    return jax.jit(decoder.init)(key, z)


def raw_latents(x0: Array, mean: Sequence[float], std: Sequence[float], sigma_d: float) -> Array:
    """Undo the latent normalisation of ``configs/imagenet512.py``:
    x0 = (latent - mean) sigma_d / std per channel, so latent = x0 std / sigma_d + mean.

    Args:
      x0: ``(B, h, w, C)`` generated (normalised) latents; mean, std: C per-channel statistics.
    Returns:
      Raw latents of the shape and dtype of ``x0``.
    """
    m = jnp.asarray(mean, x0.dtype)
    s = jnp.asarray(std, x0.dtype)
    return x0 * (s / sigma_d) + m
