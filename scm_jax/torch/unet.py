"""PyTorch twin of the EDM2 U-Net with sCM's conditioning (``scm_jax.networks.edm2_unet``), NCHW."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from scm_jax.torch.conditioning import ConditionEmbedding, batch_values
from scm_jax.torch.layers import Modulation, MPConv, mp_cat, mp_silu, mp_sum, normalize, resample
from scm_jax.torch.sampling import SCMNetwork

Tensor = torch.Tensor


class Block(nn.Module):
    """EDM2 encoder / decoder block with optional self-attention (``edm2_unet.Block``), NCHW."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
        modulation: str = "adn",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.flavor, self.resample_mode, self.dropout = flavor, resample_mode, float(dropout)
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.channels_per_head = channels_per_head
        kw = {"dtype": dtype}
        if in_channels != out_channels:
            self.conv_skip = MPConv(in_channels, out_channels, (1, 1), **kw)
        else:
            self.conv_skip = None
        c_res = out_channels if flavor == "enc" else in_channels
        self.conv_res0 = MPConv(c_res, out_channels, (3, 3), **kw)
        self.modulation = Modulation(emb_channels, out_channels, modulation, **kw)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3), **kw)
        self.attention = attention
        if attention:
            self.attn_qkv = MPConv(out_channels, 3 * out_channels, (1, 1), **kw)
            self.attn_proj = MPConv(out_channels, out_channels, (1, 1), **kw)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, H', W')``."""
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, 1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        y = mp_silu(self.modulation(y, emb))
        if self.training and self.dropout > 0:
            y = nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.attention:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = torch.clamp(x, -self.clip_act, self.clip_act)
        return x

    def _attention(self, x: Tensor) -> Tensor:
        """Plain-math multi-head self-attention with pixel-normalised q, k, v (EDM2 order)."""
        b, c, h, w = x.shape
        cph = self.channels_per_head
        y = self.attn_qkv(x).reshape(b, c // cph, cph, 3, h * w)
        q, k, v = normalize(y, 2).unbind(3)
        logits = torch.einsum("bhcq,bhck->bhqk", q, k / math.sqrt(cph))
        weights = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
        y = torch.einsum("bhqk,bhck->bhcq", weights.to(v.dtype), v).reshape(b, c, h, w)
        return self.attn_proj(y)


class UNet(SCMNetwork):
    """The EDM2 U-Net with sCM's conditioning: F_theta(x / sigma_d, t, labels, guidance), NCHW.

    Constructor arguments are those of ``scm_jax.networks.EDM2UNet`` (``dtype`` a torch dtype).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        num_classes: int = 0,
        model_channels: int = 192,
        channel_mult: tuple[int, ...] = (1, 2, 3, 4),
        num_blocks: int = 3,
        attn_resolutions: tuple[int, ...] = (16, 8),
        channels_per_head: int = 64,
        dropout: float = 0.0,
        dropout_max_res: int = 16,
        label_dropout: float = 0.0,
        guidance_input: bool = False,
        time_embedding: str = "positional",
        c_noise_mode: str = "t",
        c_noise_scale: float = 1.0,
        modulation: str = "adn",
        sigma_d: float = 0.5,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        clip_act: float | None = 256.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from scm_jax.networks.edm2_unet import check_unet_args

        check_unet_args(
            img_resolution,
            img_channels,
            model_channels,
            channel_mult,
            attn_resolutions,
            channels_per_head,
            modulation,
            time_embedding,
            c_noise_mode,
            dropout,
            label_dropout,
        )
        self.img_resolution, self.img_channels, self.sigma_d = img_resolution, img_channels, sigma_d
        self.num_classes, self.guidance_input = num_classes, guidance_input
        self.concat_balance = concat_balance
        widths = [model_channels * m for m in channel_mult]
        cemb = max(widths)
        self.cond = ConditionEmbedding(
            widths[0],
            cemb,
            num_classes,
            guidance_input,
            label_dropout,
            time_embedding,
            c_noise_mode,
            c_noise_scale,
            sigma_d,
            label_balance,
            dtype,
        )

        def block(res: int, c_in: int, c_out: int, **extra: Any) -> Block:
            return Block(
                c_in,
                c_out,
                cemb,
                channels_per_head=channels_per_head,
                dropout=dropout if res <= dropout_max_res else 0.0,
                res_balance=res_balance,
                attn_balance=attn_balance,
                clip_act=clip_act,
                modulation=modulation,
                dtype=dtype,
                **extra,
            )

        self.plan: list[tuple[str, str]] = []  # (module name, 'conv' | 'block' | 'cat_block')
        c, skips = img_channels + 1, []
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.add_module(f"enc_{res}x{res}_conv", MPConv(c, width, (3, 3), dtype=dtype))
                self.plan.append((f"enc_{res}x{res}_conv", "conv"))
                c = width
            else:
                self.add_module(f"enc_{res}x{res}_down", block(res, c, c, resample_mode="down"))
                self.plan.append((f"enc_{res}x{res}_down", "block"))
            skips.append(c)
            for i in range(num_blocks):
                attn = res in attn_resolutions
                self.add_module(f"enc_{res}x{res}_block{i}", block(res, c, width, attention=attn))
                self.plan.append((f"enc_{res}x{res}_block{i}", "block"))
                c = width
                skips.append(c)
        self.num_skips = len(skips)
        for level in reversed(range(len(widths))):
            res, width = img_resolution >> level, widths[level]
            if level == len(widths) - 1:
                for name, attn in ((f"dec_{res}x{res}_in0", True), (f"dec_{res}x{res}_in1", False)):
                    self.add_module(name, block(res, c, c, flavor="dec", attention=attn))
                    self.plan.append((name, "block"))
            else:
                name = f"dec_{res}x{res}_up"
                self.add_module(name, block(res, c, c, flavor="dec", resample_mode="up"))
                self.plan.append((name, "block"))
            for i in range(num_blocks + 1):
                attn = res in attn_resolutions
                name = f"dec_{res}x{res}_block{i}"
                self.add_module(
                    name, block(res, c + skips.pop(), width, flavor="dec", attention=attn)
                )
                self.plan.append((name, "cat_block"))
                c = width
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.out_conv = MPConv(c, img_channels, (3, 3), dtype=dtype)

    def forward(
        self,
        x_scaled: Tensor,
        t: Tensor | float,
        labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:
        """F_theta: ``x_scaled = x_t / sigma_d`` ``(B, C, R, R)``, ``t`` scalar or ``(B,)``,
        ``labels`` int ``(B,)`` (-1 null) or float ``(B, K)``, ``guidance`` ``(B,)`` for
        guidance-input models. Returns F ``(B, C, R, R)`` in x's dtype."""
        want = (self.img_channels, self.img_resolution, self.img_resolution)
        if x_scaled.ndim != 4 or tuple(x_scaled.shape[1:]) != want:
            raise ValueError(
                f"expected input of shape (B, {', '.join(map(str, want))}) (NCHW), "
                f"got {tuple(x_scaled.shape)}"
            )
        t = batch_values(t, x_scaled.shape[0], x_scaled.device, "time t")
        emb = self.cond(t, labels, guidance)
        h = torch.cat([x_scaled, torch.ones_like(x_scaled[:, :1])], dim=1)
        skips: list[Tensor] = []
        for name, kind in self.plan:
            module = getattr(self, name)
            if kind == "conv":
                h = module(h)
            else:
                if kind == "cat_block":
                    h = mp_cat(h, skips.pop(), t=self.concat_balance)
                h = module(h, emb)
            if name.startswith("enc_"):
                skips.append(h)
        return self.out_conv(h, gain=self.out_gain).to(x_scaled.dtype)
