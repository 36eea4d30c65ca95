"""A small PyTorch EDM2 (Karras et al. 2024, config G) written for the importer's tests.

It follows the paper's network (Fig. 21, Eqs. 47, 66, 75, 81, 88, 103) and the state-dict names
of NVlabs/edm2's ``Precond``/``UNet`` (``unet.enc.<R>x<R>_conv``, ``..._block<i>.emb_linear``,
``unet.emb_fourier.freqs``, ``logvar_linear``, ...), NCHW, with EDM's preconditioning (c_skip,
c_out, c_in, c_noise = ln(sigma) / 4). It is independent of ``scm_jax.torch`` on purpose: the test
checks that the imported model's TrigFlow denoiser equals this model's D(x; sigma).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as tnf


def unit(x, dims, eps=1e-4):
    n = math.prod(x.shape[d] for d in dims)
    return x / (eps + torch.linalg.vector_norm(x, dim=dims, keepdim=True) / math.sqrt(n))


def silu_mp(x):
    return tnf.silu(x) / 0.596


def sum_mp(a, b, w):
    return torch.lerp(a, b, w) / math.hypot(1 - w, w)


def cat_mp(a, b, w=0.5):
    na, nb = a.shape[1], b.shape[1]
    scale = math.sqrt((na + nb) / ((1 - w) ** 2 + w**2))
    return torch.cat([a * (scale * (1 - w) / math.sqrt(na)), b * (scale * w / math.sqrt(nb))], 1)


class Fourier(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(n))
        self.register_buffer("phases", 2 * math.pi * torch.rand(n))

    def forward(self, x):
        return math.sqrt(2) * torch.cos(torch.outer(x, self.freqs) + self.phases)


class Weighted(nn.Module):
    """Eq. 47 with forced weight normalisation (Eq. 66); OIHW or (out, in) weights."""

    def __init__(self, c_in, c_out, kernel=()):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, *kernel))

    def forward(self, x, gain=1.0):
        dims = tuple(range(1, self.weight.ndim))
        w = unit(self.weight, dims) * (gain / math.sqrt(self.weight[0].numel()))
        if w.ndim == 2:
            return x @ w.T
        return tnf.conv2d(x, w, padding=w.shape[-1] // 2)


class EncDec(nn.Module):
    def __init__(self, c_in, c_out, c_emb, flavor, resample="keep", attention=False, cph=64):
        super().__init__()
        self.flavor, self.resample, self.heads = (
            flavor,
            resample,
            (c_out // cph if attention else 0),
        )
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = Weighted(c_out if flavor == "enc" else c_in, c_out, (3, 3))
        self.emb_linear = Weighted(c_emb, c_out)
        self.conv_res1 = Weighted(c_out, c_out, (3, 3))
        self.conv_skip = Weighted(c_in, c_out, (1, 1)) if c_in != c_out else None
        if self.heads:
            self.attn_qkv = Weighted(c_out, 3 * c_out, (1, 1))
            self.attn_proj = Weighted(c_out, c_out, (1, 1))

    def forward(self, x, emb):
        if self.resample == "down":
            x = tnf.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        if self.flavor == "enc":
            x = self.conv_skip(x) if self.conv_skip is not None else x
            x = unit(x, (1,))
        y = self.conv_res0(silu_mp(x))
        y = silu_mp(y * (self.emb_linear(emb, self.emb_gain) + 1)[:, :, None, None])
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = sum_mp(x, y, 0.3)
        if self.heads:
            n, c, h, w = x.shape
            qkv = unit(self.attn_qkv(x).reshape(n, self.heads, c // self.heads, 3, h * w), (2,))
            q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
            a = torch.softmax(q.transpose(2, 3) @ k / math.sqrt(c // self.heads), dim=-1)
            out = (v @ a.transpose(2, 3)).reshape(n, c, h, w)
            x = sum_mp(x, self.attn_proj(out), 0.3)
        return x.clamp(-256, 256)


class UNet(nn.Module):
    def __init__(self, res, channels, label_dim, model_channels, mult, blocks, attn, cph=64):
        super().__init__()
        widths = [model_channels * m for m in mult]
        c_emb = max(widths)
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = Fourier(widths[0])
        self.emb_noise = Weighted(widths[0], c_emb)
        self.emb_label = Weighted(label_dim, c_emb) if label_dim else None
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        c = channels + 1
        for level, width in enumerate(widths):
            r = res >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = Weighted(c, width, (3, 3))
                c = width
            else:
                self.enc[f"{r}x{r}_down"] = EncDec(c, c, c_emb, "enc", "down", cph=cph)
            for i in range(blocks):
                self.enc[f"{r}x{r}_block{i}"] = EncDec(
                    c, width, c_emb, "enc", attention=r in attn, cph=cph
                )
                c = width
        skip_widths = [
            m.conv_res1.weight.shape[0] if isinstance(m, EncDec) else m.weight.shape[0]
            for m in self.enc.values()
        ]
        for level in reversed(range(len(widths))):
            r, width = res >> level, widths[level]
            if level == len(widths) - 1:
                self.dec[f"{r}x{r}_in0"] = EncDec(c, c, c_emb, "dec", attention=True, cph=cph)
                self.dec[f"{r}x{r}_in1"] = EncDec(c, c, c_emb, "dec", cph=cph)
            else:
                self.dec[f"{r}x{r}_up"] = EncDec(c, c, c_emb, "dec", "up", cph=cph)
            for i in range(blocks + 1):
                self.dec[f"{r}x{r}_block{i}"] = EncDec(
                    c + skip_widths.pop(), width, c_emb, "dec", attention=r in attn, cph=cph
                )
                c = width
        self.out_conv = Weighted(c, channels, (3, 3))

    def forward(self, x, c_noise, labels):
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            emb = sum_mp(emb, self.emb_label(labels * math.sqrt(labels.shape[1])), 0.5)
        emb = silu_mp(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        skips = []
        for name, m in self.enc.items():
            x = m(x) if name.endswith("_conv") else m(x, emb)
            skips.append(x)
        for name, m in self.dec.items():
            if "block" in name:
                x = cat_mp(x, skips.pop())
            x = m(x, emb)
        return self.out_conv(x, self.out_gain)


class Precond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4, labels) (EDM Table 1)."""

    def __init__(self, res, channels, label_dim, sigma_data=0.5, logvar_channels=128, **unet):
        super().__init__()
        self.sigma_data, self.label_dim = sigma_data, label_dim
        self.unet = UNet(res, channels, label_dim, **unet)
        self.logvar_fourier = Fourier(logvar_channels)
        self.logvar_linear = Weighted(logvar_channels, 1)

    def forward(self, x, sigma, labels=None):
        sd, s = self.sigma_data, sigma.reshape(-1, 1, 1, 1)
        if labels is None:
            labels = torch.zeros(x.shape[0], self.label_dim)
        F = self.unet(x / torch.sqrt(sd**2 + s**2), torch.log(sigma) / 4, labels)
        return sd**2 / (s**2 + sd**2) * x + s * sd / torch.sqrt(s**2 + sd**2) * F
