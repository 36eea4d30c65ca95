"""EDM2 U-Net (Karras et al. 2024, config G, Fig. 21) with the sCM changes (Lu & Song 2024, §4.1).

F_theta(x_t / sigma_d, t, labels, guidance) -> F, channels-last. Stock EDM2 is recovered with
``time_embedding='fourier', c_noise_mode='edm', modulation='mul'``; the sCM defaults are
``'positional'``, ``'t'`` and ``'adn'``. The TrigFlow preconditioning c_in = 1 / sigma_d is applied
by the caller (the input *is* x_t / sigma_d, the primal of sCM's JVP); c_skip and c_out live in
``scm_jax.trigflow``.

Everything is plain jnp (attention included), so ``jax.jvp`` with respect to (x, t) works with
the parameters closed over, exactly as the sCT / sCD objectives use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scm_jax.networks.conditioning import ConditionEmbedding, batch_times, check_conditioning_args
from scm_jax.networks.layers import Modulation, MPConv, mp_cat, mp_silu, mp_sum, normalize, resample
from scm_jax.sharding import constrain

# Logical axes of the blocks' outputs, pinned under ``scm_jax.sharding.activation_rules``.
ACTIVATION_AXES = ("batch", "height", "width", "channels")

Array = jax.Array
Dtype = Any


class Block(nn.Module):
    """EDM2 encoder / decoder block with optional self-attention (EDM2 Fig. 21).

    Input ``(B, H, W, C_in)`` and embedding ``(B, C_emb)``; output ``(B, H', W', out_channels)``
    where H' is H halved, doubled or kept by ``resample_mode``.
    """

    out_channels: int
    flavor: str = "enc"  # 'enc' or 'dec'
    resample_mode: str = "keep"  # 'keep', 'up' or 'down'
    attention: bool = False
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256.0
    modulation: str = "adn"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
        """Apply the block (dropout only when ``train``; needs the 'dropout' RNG then)."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        c_out = self.out_channels
        x = resample(x, self.resample_mode)
        skip_conv = MPConv(c_out, (1, 1), name="conv_skip", **kw) if x.shape[-1] != c_out else None
        if self.flavor == "enc":
            if skip_conv is not None:
                x = skip_conv(x)
            x = normalize(x, axis=-1)  # pixel norm

        # Residual branch.
        y = MPConv(c_out, (3, 3), name="conv_res0", **kw)(mp_silu(x))
        y = Modulation(c_out, self.modulation, name="modulation", **kw)(y, emb)
        y = mp_silu(y)
        if train and self.dropout > 0:
            y = nn.Dropout(self.dropout)(y, deterministic=False)
        y = MPConv(c_out, (3, 3), name="conv_res1", **kw)(y)

        # Connect the branches.
        if self.flavor == "dec" and skip_conv is not None:
            x = skip_conv(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.attention:
            x = mp_sum(x, self._attention(x, kw), t=self.attn_balance)
        if self.clip_act is not None:
            x = jnp.clip(x, -self.clip_act, self.clip_act)
        return constrain(x, ACTIVATION_AXES) if x.ndim == 4 else x

    def _attention(self, x: Array, kw: dict) -> Array:
        """Multi-head self-attention over the H*W positions with pixel-normalised q, k, v."""
        b, h, w, c = x.shape
        heads = c // self.channels_per_head
        y = MPConv(3 * c, (1, 1), name="attn_qkv", **kw)(x)
        # EDM2's channel order: (heads, channels_per_head, 3), so weights import by transposition.
        y = y.reshape(b, h * w, heads, self.channels_per_head, 3)
        y = normalize(y, axis=3)
        q, k, v = y[..., 0], y[..., 1], y[..., 2]
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k / math.sqrt(self.channels_per_head))
        weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
        y = jnp.einsum("bhqk,bkhc->bqhc", weights.astype(v.dtype), v).reshape(b, h, w, c)
        return MPConv(c, (1, 1), name="attn_proj", **kw)(y)


# Block whose activations are recomputed in the backward pass: only its inputs (x, emb) are kept;
# ``train`` (argument 3, counting self) is static. The dropout RNG is lifted, so the recomputed
# masks equal the forward's. Parameter paths are those of Block.
RematBlock = nn.remat(Block, static_argnums=(3,))


def check_unet_args(
    img_resolution: int,
    img_channels: int,
    model_channels: int,
    channel_mult: Sequence[int],
    attn_resolutions: Sequence[int],
    channels_per_head: int,
    modulation: str,
    time_embedding: str,
    c_noise_mode: str,
    dropout: float,
    label_dropout: float,
) -> None:
    """Raise ValueError naming the bad value if the U-Net hyperparameters are inconsistent."""
    levels = len(channel_mult)
    if levels < 1 or any(m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be positive integers, got {tuple(channel_mult)}")
    factor = 2 ** (levels - 1)
    if img_resolution < 1 or img_resolution % factor:
        raise ValueError(
            f"img_resolution={img_resolution} is not divisible by the total downsampling "
            f"{factor} (2^(len(channel_mult)-1) with channel_mult={tuple(channel_mult)}); "
            "use fewer levels or another resolution"
        )
    if img_channels < 1 or model_channels < 1:
        raise ValueError(
            f"img_channels={img_channels}, model_channels={model_channels} must be >= 1"
        )
    resolutions = {img_resolution >> i for i in range(levels)}
    for r in attn_resolutions:
        if r not in resolutions:
            raise ValueError(
                f"attention resolution {r} is not one of the U-Net's resolutions "
                f"{sorted(resolutions)}"
            )
    lowest = model_channels * channel_mult[-1]
    widths = [model_channels * m for m in channel_mult]
    for r, c in [(img_resolution >> i, widths[i]) for i in range(levels)] + [(-1, lowest)]:
        if (r in attn_resolutions or r == -1) and c % channels_per_head:
            raise ValueError(
                f"{c} channels are not divisible by channels_per_head={channels_per_head}"
            )
    check_conditioning_args(modulation, time_embedding, c_noise_mode, dropout, label_dropout)


class EDM2UNet(nn.Module):
    """The EDM2 U-Net as an sCM network F_theta(x / sigma_d, t, labels, guidance).

    Attributes:
      img_resolution: input height = width (must be divisible by 2^(levels - 1)).
      img_channels: input channels (3 pixels, 4 SD-VAE latents, 1 MNIST).
      num_classes: K, 0 for unconditional.
      model_channels: base width (EDM2 sizes xs..xxl: 128, 192, 256, 320, 384, 448).
      channel_mult: width multiplier per resolution level.
      num_blocks: residual blocks per level in the encoder (decoder: one more).
      attn_resolutions: resolutions with self-attention (the innermost decoder block always has it).
      channels_per_head: attention head width.
      dropout: dropout probability in the residual branches.
      dropout_max_res: dropout only in blocks whose resolution is <= this (sCM: 16).
      label_dropout: probability of dropping the label in training (CFG teachers).
      guidance_input: take a per-sample guidance scale (sCD students of a CFG teacher).
      time_embedding, c_noise_mode, c_noise_scale, modulation: conditioning (see module doc).
      sigma_d: data std (used only by ``c_noise_mode='edm'``).
      res_balance, attn_balance, label_balance, concat_balance, clip_act: EDM2 constants.
      dtype: compute dtype (None: the input's); param_dtype: storage dtype.
      remat_blocks: rematerialise every :class:`Block` (``flax.linen.remat``): the backward pass
        keeps only each block's inputs and recomputes its insides (set by ``model.remat``
        'block' / 'full' through ``build_network``; parameters are the same either way).
    """

    img_resolution: int
    img_channels: int
    num_classes: int = 0
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    channels_per_head: int = 64
    dropout: float = 0.0
    dropout_max_res: int = 16
    label_dropout: float = 0.0
    guidance_input: bool = False
    time_embedding: str = "positional"
    c_noise_mode: str = "t"
    c_noise_scale: float = 1.0
    modulation: str = "adn"
    sigma_d: float = 0.5
    res_balance: float = 0.3
    attn_balance: float = 0.3
    label_balance: float = 0.5
    concat_balance: float = 0.5
    clip_act: float | None = 256.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    remat_blocks: bool = False

    def __post_init__(self) -> None:
        check_unet_args(
            self.img_resolution, self.img_channels, self.model_channels, self.channel_mult,
            self.attn_resolutions, self.channels_per_head, self.modulation, self.time_embedding,
            self.c_noise_mode, self.dropout, self.label_dropout,
        )  # fmt: skip
        super().__post_init__()

    def check_input(self, x: Array) -> None:
        """Raise if ``x`` is not a float array of shape ``(B, R, R, C)`` for this network."""
        want = (self.img_resolution, self.img_resolution, self.img_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"expected input of shape (B, {', '.join(map(str, want))}), got {x.shape}"
            )
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
        """Compute F_theta.

        Args:
          x: x_t / sigma_d, ``(B, R, R, C)`` float.
          t: TrigFlow time, scalar or ``(B,)`` float.
          labels: None, int ``(B,)`` (-1 = null) or float ``(B, K)``.
          guidance: ``(B,)`` or scalar guidance scale if ``guidance_input``.
          train: enables dropout and label dropout (needs the 'dropout' RNG).
        Returns:
          F with the shape of ``x``, in the dtype of ``x``.
        """
        self.check_input(x)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        widths = [self.model_channels * m for m in self.channel_mult]
        t = batch_times(t, x.shape[0])
        emb = ConditionEmbedding(
            noise_channels=widths[0], emb_channels=max(widths), num_classes=self.num_classes,
            guidance_input=self.guidance_input, label_dropout=self.label_dropout,
            time_embedding=self.time_embedding, c_noise_mode=self.c_noise_mode,
            c_noise_scale=self.c_noise_scale, sigma_d=self.sigma_d,
            label_balance=self.label_balance, name="cond", **kw,
        )(t, labels, guidance, train)  # fmt: skip

        def block(res: int, name: str, c: int, **extra: Any) -> Block:
            p = self.dropout if res <= self.dropout_max_res else 0.0
            return (RematBlock if self.remat_blocks else Block)(
                c, dropout=p, channels_per_head=self.channels_per_head,
                res_balance=self.res_balance, attn_balance=self.attn_balance,
                clip_act=self.clip_act, modulation=self.modulation, name=name, **kw, **extra,
            )  # fmt: skip

        # Encoder; an extra constant-one channel gives the first conv a bias (EDM2).
        h = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
        skips = []
        for level, c in enumerate(widths):
            res = self.img_resolution >> level
            if level == 0:
                h = MPConv(c, (3, 3), name=f"enc_{res}x{res}_conv", **kw)(h)
            else:
                h = block(res, f"enc_{res}x{res}_down", h.shape[-1], resample_mode="down")(
                    h, emb, train
                )
            skips.append(h)
            for i in range(self.num_blocks):
                attn = res in self.attn_resolutions
                h = block(res, f"enc_{res}x{res}_block{i}", c, attention=attn)(h, emb, train)
                skips.append(h)

        # Decoder.
        for level in reversed(range(len(widths))):
            res, c = self.img_resolution >> level, widths[level]
            if level == len(widths) - 1:
                h = block(res, f"dec_{res}x{res}_in0", h.shape[-1], flavor="dec", attention=True)(
                    h, emb, train
                )
                h = block(res, f"dec_{res}x{res}_in1", h.shape[-1], flavor="dec")(h, emb, train)
            else:
                h = block(
                    res, f"dec_{res}x{res}_up", h.shape[-1], flavor="dec", resample_mode="up"
                )(h, emb, train)
            for i in range(self.num_blocks + 1):
                h = mp_cat(h, skips.pop(), t=self.concat_balance)
                attn = res in self.attn_resolutions
                h = block(res, f"dec_{res}x{res}_block{i}", c, flavor="dec", attention=attn)(
                    h, emb, train
                )

        out_gain = self.param("out_gain", nn.initializers.zeros, (), self.param_dtype)
        F = MPConv(self.img_channels, (3, 3), name="out_conv", **kw)(h, gain=out_gain)
        return F.astype(x.dtype)
