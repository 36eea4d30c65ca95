"""PyTorch twins of the sCM networks: the EDM2 U-Net and the toy MP-MLP (``scm_jax.networks``).

``forward(x_scaled, t, labels=None, guidance=None)`` computes F_theta exactly as the JAX modules
do, for every option they have (both archs, ``'adn'``/``'mul'`` modulation, positional / Fourier /
stored-Fourier time embeddings, c_noise ``'t'``/``'edm'``, guidance input, labels, attention
resolutions, channel multipliers, dropout and label dropout in ``train()`` mode). Images are NCHW.
Module and parameter names follow the Flax tree (``enc_8x8_block0.conv_res0.weight`` is
``params['enc_8x8_block0']['conv_res0']['weight']``), so a ``state_dict`` is an export's
safetensors file as it is (``scm_jax.export.state_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from scm_jax.networks.embeddings import C_NOISE_MODES, TIME_EMBEDDINGS, fourier_constants
from scm_jax.torch.layers import MODULATIONS, Modulation, MPConv, mp_cat, mp_silu, mp_sum
from scm_jax.torch.layers import normalize, resample
from scm_jax.torch.sampling import consistency_times, sample_consistency

Tensor = torch.Tensor
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}  # fmt: skip


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
        self, noise_channels: int, emb_channels: int, num_classes: int = 0,
        guidance_input: bool = False, label_dropout: float = 0.0,
        time_embedding: str = "positional", c_noise_mode: str = "t", c_noise_scale: float = 1.0,
        sigma_d: float = 0.5, label_balance: float = 0.5, dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_classes, self.guidance_input = int(num_classes), bool(guidance_input)
        self.label_dropout, self.label_balance = float(label_dropout), float(label_balance)
        self.time_embedding, self.c_noise_mode = time_embedding, c_noise_mode
        self.c_noise_scale, self.sigma_d = float(c_noise_scale), float(sigma_d)
        if time_embedding == "positional" or guidance_input:
            self.register_buffer("pos_freqs", _positional_freqs(noise_channels), persistent=False)
        if time_embedding == "fourier":
            f0, p0 = fourier_constants(noise_channels)
            self.register_buffer("fourier_freqs", torch.from_numpy(f0.astype(np.float32)),
                                 persistent=False)  # fmt: skip
            self.register_buffer("fourier_phases", torch.from_numpy(p0.astype(np.float32)),
                                 persistent=False)  # fmt: skip
        elif time_embedding == "edm2_fourier":
            self.emb_fourier = StoredFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, dtype=dtype)
        if guidance_input:
            self.emb_guidance = MPConv(noise_channels, emb_channels, dtype=dtype)
        if num_classes:
            self.emb_label = MPConv(num_classes, emb_channels, dtype=dtype)

    def c_noise(self, t: Tensor) -> Tensor:
        """c_noise(t) in at least float32: ``scale * t`` or EDM's ln(sigma_d tan t) / 4."""
        t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        if self.c_noise_mode == "t":
            return self.c_noise_scale * t
        return torch.log(self.sigma_d * torch.tan(t)) / 4

    def label_vectors(self, labels: Tensor | None, batch: int, like: Tensor) -> Tensor:
        """``(B, K)`` float vectors of int labels (-1 = null), one-hot/soft floats, or None."""
        k = self.num_classes
        if labels is None:
            return like.new_zeros((batch, k))
        labels = torch.as_tensor(labels, device=like.device)
        if not labels.is_floating_point():
            if labels.shape != (batch,):
                raise ValueError(f"integer labels must have shape ({batch},), got "
                                 f"{tuple(labels.shape)}")  # fmt: skip
            classes = torch.arange(k, device=like.device)
            return (labels[:, None] == classes[None, :]).to(like.dtype)  # -1 -> all zeros
        if labels.shape != (batch, k):
            raise ValueError(f"float labels must have shape ({batch}, {k}), got "
                             f"{tuple(labels.shape)}")  # fmt: skip
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
                raise ValueError("this network takes a guidance scale: pass guidance= of shape "
                                 "(B,) (1.0 means no guidance)")  # fmt: skip
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


class Block(nn.Module):
    """EDM2 encoder / decoder block with optional self-attention (``edm2_unet.Block``), NCHW."""

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
        resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
        dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
        clip_act: float | None = 256.0, modulation: str = "adn", dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
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


class SCMNetwork(nn.Module):
    """Base of :class:`UNet` and :class:`MLP`: TrigFlow constants and the consistency sampler.

    Attributes (set by ``scm_jax.torch.load_network`` from the export's config): ``sigma_d``,
    ``t_max`` (first sampling time, arctan(sigma_max / sigma_d)), ``t_mid`` (2-step middle time),
    ``guidance`` (default guidance input of guidance-input models), ``config``.
    """

    sigma_d: float = 0.5
    t_max: float = math.atan(80.0 / 0.5)
    t_mid: float = 1.1
    guidance: float | None = None
    guidance_input: bool = False
    config: dict[str, Any] | None = None

    def _default_guidance(self, guidance: Tensor | float | None) -> Tensor | float | None:
        if guidance is None and self.guidance_input:
            return 1.0 if self.guidance is None else self.guidance
        return guidance

    def sample(
        self, noise: Tensor, steps: int = 2, labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:  # fmt: skip
        """x0 ``(B, *shape)`` by ``steps``-step consistency sampling (sCM's t_max, t_mid) from
        standard-normal ``noise`` ``(steps, B, *shape)``; images are not clipped."""
        times = consistency_times(steps, self.t_max, self.t_mid)
        return sample_consistency(
            self, noise, times, self.sigma_d, labels, self._default_guidance(guidance)
        )

    def consistency(
        self, x_t: Tensor, t: Tensor | float, labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:  # fmt: skip
        """f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t / sigma_d, t) (sCM Eq. 5)."""
        t = batch_values(torch.as_tensor(t, dtype=x_t.dtype), x_t.shape[0], x_t.device, "time t")
        F = self(x_t / self.sigma_d, t, labels, self._default_guidance(guidance))
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        return torch.cos(t).reshape(shape) * x_t - torch.sin(t).reshape(shape) * self.sigma_d * F


class UNet(SCMNetwork):
    """The EDM2 U-Net with sCM's conditioning: F_theta(x / sigma_d, t, labels, guidance), NCHW.

    Constructor arguments are those of ``scm_jax.networks.EDM2UNet`` (``dtype`` a torch dtype).
    """

    def __init__(
        self, img_resolution: int, img_channels: int, num_classes: int = 0,
        model_channels: int = 192, channel_mult: tuple[int, ...] = (1, 2, 3, 4),
        num_blocks: int = 3, attn_resolutions: tuple[int, ...] = (16, 8),
        channels_per_head: int = 64, dropout: float = 0.0, dropout_max_res: int = 16,
        label_dropout: float = 0.0, guidance_input: bool = False,
        time_embedding: str = "positional", c_noise_mode: str = "t", c_noise_scale: float = 1.0,
        modulation: str = "adn", sigma_d: float = 0.5, res_balance: float = 0.3,
        attn_balance: float = 0.3, label_balance: float = 0.5, concat_balance: float = 0.5,
        clip_act: float | None = 256.0, dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        from scm_jax.networks.edm2_unet import check_unet_args

        check_unet_args(img_resolution, img_channels, model_channels, channel_mult,
                        attn_resolutions, channels_per_head, modulation, time_embedding,
                        c_noise_mode, dropout, label_dropout)  # fmt: skip
        self.img_resolution, self.img_channels, self.sigma_d = img_resolution, img_channels, sigma_d
        self.num_classes, self.guidance_input = num_classes, guidance_input
        self.concat_balance = concat_balance
        widths = [model_channels * m for m in channel_mult]
        cemb = max(widths)
        self.cond = ConditionEmbedding(
            widths[0], cemb, num_classes, guidance_input, label_dropout, time_embedding,
            c_noise_mode, c_noise_scale, sigma_d, label_balance, dtype,
        )  # fmt: skip

        def block(res: int, c_in: int, c_out: int, **extra: Any) -> Block:
            return Block(
                c_in, c_out, cemb, channels_per_head=channels_per_head,
                dropout=dropout if res <= dropout_max_res else 0.0, res_balance=res_balance,
                attn_balance=attn_balance, clip_act=clip_act, modulation=modulation,
                dtype=dtype, **extra,
            )  # fmt: skip

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
        self, x_scaled: Tensor, t: Tensor | float, labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:  # fmt: skip
        """F_theta: ``x_scaled = x_t / sigma_d`` ``(B, C, R, R)``, ``t`` scalar or ``(B,)``,
        ``labels`` int ``(B,)`` (-1 null) or float ``(B, K)``, ``guidance`` ``(B,)`` for
        guidance-input models. Returns F ``(B, C, R, R)`` in x's dtype."""
        want = (self.img_channels, self.img_resolution, self.img_resolution)
        if x_scaled.ndim != 4 or tuple(x_scaled.shape[1:]) != want:
            raise ValueError(f"expected input of shape (B, {', '.join(map(str, want))}) (NCHW), "
                             f"got {tuple(x_scaled.shape)}")  # fmt: skip
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


class MLP(SCMNetwork):
    """The toy residual MP-MLP (``scm_jax.networks.MLPNet``): ``(B, D)`` -> F ``(B, D)``."""

    def __init__(
        self, data_dim: int = 2, hidden: int = 256, depth: int = 4, emb_channels: int = 128,
        num_classes: int = 0, guidance_input: bool = False, label_dropout: float = 0.0,
        dropout: float = 0.0, time_embedding: str = "positional", c_noise_mode: str = "t",
        c_noise_scale: float = 1.0, modulation: str = "adn", sigma_d: float = 0.5,
        res_balance: float = 0.3, dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        from scm_jax.networks.conditioning import check_conditioning_args

        check_conditioning_args(modulation, time_embedding, c_noise_mode, dropout, label_dropout)
        self.data_dim, self.depth, self.dropout = data_dim, depth, float(dropout)
        self.sigma_d = sigma_d
        self.num_classes, self.guidance_input = num_classes, guidance_input
        self.res_balance = res_balance
        self.cond = ConditionEmbedding(
            emb_channels, emb_channels, num_classes, guidance_input, label_dropout,
            time_embedding, c_noise_mode, c_noise_scale, sigma_d, 0.5, dtype,
        )  # fmt: skip
        self.in_linear = MPConv(data_dim + 1, hidden, dtype=dtype)
        for i in range(depth):
            self.add_module(f"block{i}_linear0", MPConv(hidden, hidden, dtype=dtype))
            self.add_module(f"block{i}_mod", Modulation(emb_channels, hidden, modulation, dtype))
            self.add_module(f"block{i}_linear1", MPConv(hidden, hidden, dtype=dtype))
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.out_linear = MPConv(hidden, data_dim, dtype=dtype)

    def forward(
        self, x_scaled: Tensor, t: Tensor | float, labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:  # fmt: skip
        """F_theta on ``(B, D)`` (arguments as :meth:`UNet.forward`)."""
        if x_scaled.ndim != 2 or x_scaled.shape[1] != self.data_dim:
            raise ValueError(f"expected input of shape (B, {self.data_dim}), got "
                             f"{tuple(x_scaled.shape)}")  # fmt: skip
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


ARCHS = {"edm2_unet": UNet, "mlp": MLP}
# Model-section keys that do not change the function (or are JAX-only memory levers).
_IGNORED_KEYS = ("arch", "size", "weight_channels", "param_dtype", "remat")


def build_network(model_cfg: Mapping[str, Any]) -> nn.Module:
    """The PyTorch network of a config's ``model`` section (as ``scm_jax.networks.build_network``).

    Raises:
      ValueError: an arch or option this PyTorch port does not implement (named), so an export
        never runs a silently different network.
    """
    cfg = dict(model_cfg)
    arch = cfg.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch {arch!r}; the PyTorch port has {sorted(ARCHS)}")
    for name, value, choices in (
        ("modulation", cfg.get("modulation", "adn"), MODULATIONS),
        ("time_embedding", cfg.get("time_embedding", "positional"), TIME_EMBEDDINGS),
        ("c_noise_mode", cfg.get("c_noise_mode", "t"), C_NOISE_MODES),
    ):
        if value not in choices:
            raise ValueError(f"model.{name}={value!r} is not implemented in the PyTorch port "
                             f"(it has {choices})")  # fmt: skip
    cls = ARCHS[arch]
    import inspect

    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in cfg.items() if k not in _IGNORED_KEYS}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"model option(s) {unknown} of arch {arch!r} are not implemented in the "
                         "PyTorch port; export refused rather than run a different network")  # fmt: skip
    dtype = kwargs.pop("dtype", None)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"unknown model.dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    kwargs["dtype"] = None if dtype in (None, "float32") else _DTYPES[dtype]
    for key in ("channel_mult", "attn_resolutions"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return cls(**kwargs)
