"""sCD in PyTorch, written the way the PyTorch peers write it (NVlabs FastGen, SANA-Sprint): the
reference that ``benchmarks/peer_torch.py`` times against the JAX step (docs/performance.md).

The math is ``scm_jax.losses.consistency`` (sCM Alg. 1; reference §2.3-2.5), line for line:

  dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t)     (CFG: F(∅) + s (F(y) - F(∅)), one call on a
                                                      doubled batch, s the student's input too)
  F-, J   = torch.func.jvp(F_theta-, (x_t / sigma_d, t), (cos t sin t dx_t/dt, cos t sin t sigma_d))
  g       = -cos^2 t (sigma_d F- - dx_t/dt) - r (cos t sin t x_t + J);   g <- g / (||g|| + c)
  L       = (e^{w_phi(t)} / D) ||F_theta - F_theta- - g||^2 - w_phi(t)

with theta- the current parameters under ``torch.no_grad`` (not an EMA), r = min(1, step / H),
non-finite targets masked per sample. :class:`SCDStep` adds what a training step does around it:
noise, times and CFG scales drawn on the device, ``torch.autocast`` (bf16 compute, float32
master weights), backward, the global gradient norm, Adam with EDM2's learning-rate decay, the
forced weight normalisation (EDM2 Eq. 66) and the power-function EMAs, without a host sync.
``compile=True`` runs the loss (teacher, JVP, student forward; AOTAutograd adds the backward)
through ``torch.compile``.

Differences from ``scm_jax.train.step`` (both favour PyTorch's time): no skipping of a step whose
loss or gradient is not finite (that needs a host sync in eager PyTorch), no per-time-bin loss
diagnostics; and with dropout > 0 the JVP pass and the gradient pass draw their own masks (the
peers do the same; the JAX step shares them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from scm_jax.ema import power_exponent

Tensor = torch.Tensor
TANGENT_NORMS = ("l2", "rms", "clip", "none")
WARMUP_FORMS = ("scm", "rcm")


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` -> broadcastable against ``like`` ``(B, ...)``."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def per_sample_sum(x: Tensor) -> Tensor:
    """``(B, ...)`` -> ``(B,)`` sums in at least float32."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x.sum(dim=tuple(range(1, x.ndim)))


def teacher_velocity(
    teacher: nn.Module, x_t: Tensor, t: Tensor, *, sigma_d: float,
    labels: Tensor | None = None, guidance: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """sigma_d F_teacher(x_t / sigma_d, t), classifier-free guided at ``guidance`` ``(B,)`` (one
    call on the doubled batch, null label -1) or unguided (None). No gradient."""
    x_scaled = x_t / sigma_d
    with torch.no_grad():
        if guidance is None:
            F_T = teacher(x_scaled, t, labels)
        else:
            if labels is None:
                raise ValueError("classifier-free guidance of the teacher needs class labels")
            b = x_t.shape[0]
            F = teacher(
                torch.cat([x_scaled, x_scaled]),
                torch.cat([t, t]),
                torch.cat([labels, torch.full_like(labels, -1)]),
            )
            F_cond, F_uncond = F[:b], F[b:]
            F_T = F_uncond + _expand(guidance.to(F.dtype), F) * (F_cond - F_uncond)
    return sigma_d * F_T


def tangent_jvp(
    net: nn.Module, x_t: Tensor, t: Tensor, dx_dt: Tensor, *, sigma_d: float,
    labels: Tensor | None = None, guidance: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """F- and J = sigma_d cos t sin t dF-/dt from one ``torch.func.jvp`` of the network under
    ``torch.no_grad`` (parameters are constants), primals (x_t / sigma_d, t), tangents
    (cos t sin t dx_t/dt, cos t sin t sigma_d) (sCM §5.1). Both ``(B, ...)``."""
    cs = torch.cos(t) * torch.sin(t)

    def F_minus(x_scaled: Tensor, tt: Tensor) -> Tensor:
        return net(x_scaled, tt, labels, guidance)

    with torch.no_grad():
        return torch.func.jvp(F_minus, (x_t / sigma_d, t), (_expand(cs, x_t) * dx_dt, cs * sigma_d))


def normalize_tangent(g: Tensor, mode: str = "l2", c: float = 0.1) -> Tensor:
    """``scm_jax.losses.normalize_tangent``: g / (||g|| + c) (``'l2'``), the RMS variant,
    elementwise clipping, or ``'none'``."""
    if mode == "none":
        return g
    if mode == "clip":
        return torch.clamp(g, -1.0, 1.0)
    if mode not in ("l2", "rms"):
        raise ValueError(f"unknown tangent normalisation {mode!r}; expected one of {TANGENT_NORMS}")
    norm = torch.sqrt(per_sample_sum(g * g))
    if mode == "rms":
        norm = norm / math.sqrt(math.prod(g.shape[1:]))
    return g / (_expand(norm, g) + c)


def scd_loss(
    net: nn.Module, head: nn.Module | None, teacher: nn.Module, x0: Tensor, z: Tensor,
    t: Tensor, r: Tensor | float, *, sigma_d: float, labels: Tensor | None = None,
    guidance: Tensor | None = None, warmup_form: str = "scm", tangent_norm: str = "l2",
    tangent_c: float = 0.1, mask_nonfinite: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """The sCD loss (sCM Eq. 8) of ``scm_jax.losses.scd_loss``, in PyTorch.

    Args:
      net: the student F_theta (``forward(x_scaled, t, labels, guidance)``, NCHW); head: w_phi
        (``scm_jax.torch.weighting.AdaptiveWeight``, run in float32) or None (fixed weight).
      teacher: F_teacher (no guidance input).
      x0, z: ``(B, C, H, W)`` data and noise (std sigma_d); t: ``(B,)`` times in (0, pi/2).
      r: the tangent warm-up coefficient (a 0-d tensor keeps ``torch.compile`` from
        recompiling as it changes).
      labels: int ``(B,)``; guidance: ``(B,)`` CFG scales (the student's input) or None.
      warmup_form, tangent_norm, tangent_c, mask_nonfinite: as ``consistency_loss``.
    Returns:
      ``(loss, aux)``: the scalar loss (float32) and ``g_norm`` ``(B,)`` (raw target norms),
      ``finite`` ``(B,)``, ``w`` ``(B,)``.
    """
    if warmup_form not in WARMUP_FORMS:
        raise ValueError(f"unknown warmup_form {warmup_form!r}; expected one of {WARMUP_FORMS}")
    D = math.prod(x0.shape[1:])
    c, s = _expand(torch.cos(t), x0), _expand(torch.sin(t), x0)
    x_t = c * x0 + s * z
    dx_dt = teacher_velocity(teacher, x_t, t, sigma_d=sigma_d, labels=labels, guidance=guidance)
    F_m, J = tangent_jvp(net, x_t, t, dx_dt, sigma_d=sigma_d, labels=labels, guidance=guidance)
    with torch.no_grad():
        residual = sigma_d * F_m - dx_dt
        if warmup_form == "scm":
            g = -(c**2) * residual - r * (c * s * x_t + J)
        else:
            g = -c * torch.sqrt(1 - (r * s) ** 2) * residual - (r * c * s * x_t + J)
        g_norm = torch.sqrt(per_sample_sum(g**2))
        finite = torch.isfinite(g_norm)
        if mask_nonfinite:
            g = torch.where(_expand(finite, g), g, torch.zeros_like(g))
        g = normalize_tangent(g, tangent_norm, tangent_c)
    F = net(x_t / sigma_d, t, labels, guidance)
    sq_err = per_sample_sum((F - F.detach() - g) ** 2)
    if head is None:
        w = torch.zeros_like(sq_err)
        per_sample = sq_err / D
    else:
        with torch.autocast(x0.device.type, enabled=False):
            w = head(t.float())
        per_sample = torch.exp(w) / D * sq_err - w
    keep = finite if mask_nonfinite else torch.ones_like(finite)
    per_sample = torch.where(keep, per_sample, torch.zeros_like(per_sample))
    loss = per_sample.sum() / keep.sum().clamp_min(1)
    return loss, {"g_norm": g_norm, "finite": finite, "w": w}


class SCDStep:
    """One sCD training step of ``net`` (and ``head``) distilling ``teacher``, in place.

    ``step(x0, labels)`` draws z ~ N(0, sigma_d^2), t = arctan(e^tau / sigma_d) with tau ~
    N(P_mean, P_std^2) and, for a guidance-input student, s ~ U[guidance_range], on the device;
    computes :func:`scd_loss` under ``torch.autocast(autocast)``, back-propagates, takes an Adam
    step at EDM2's learning rate lr / sqrt(max(n / n_ref, 1)) (n images seen), projects every
    weight to unit RMS per output channel and advances the EMAs. Returns ``(loss, grad_norm)``
    as device tensors (no host sync); ``emas`` holds the EMA copies of ``net``'s parameters.

    Args:
      net, head, teacher: modules on one device, float32 parameters (the teacher frozen).
      sigma_d, P_mean, P_std: TrigFlow's data std and time proposal.
      batch_size: images per step (learning-rate decay and EMAs).
      guidance_range: ``(s_min, s_max)``; used when ``net.guidance_input``.
      warmup_steps: H of the tangent warm-up (0: none); loss_options: ``scd_loss``'s options.
      lr, betas, eps, lr_ref_kimg: Adam and its decay (``config.optim``; no ramp-up, no clip).
      power_std: sigma_rel of each power-function EMA (``config.ema``).
      autocast: compute dtype under ``torch.autocast`` (None: float32).
      compile: ``torch.compile`` the loss (``compile_options``: its keyword arguments);
        ``loss_fn`` is what the step calls, ``eager_loss_fn`` the uncompiled loss.
    """

    def __init__(
        self, net: nn.Module, head: nn.Module | None, teacher: nn.Module, *, sigma_d: float,
        P_mean: float, P_std: float, batch_size: int,
        guidance_range: tuple[float, float] = (1.0, 1.0), warmup_steps: int = 10_000,
        loss_options: dict[str, Any] | None = None, lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8, lr_ref_kimg: float = 0.0,
        power_std: Sequence[float] = (0.05,), autocast: torch.dtype | None = torch.bfloat16,
        compile: bool = False, compile_options: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.net, self.head, self.teacher = net.train(), head, teacher.eval().requires_grad_(False)
        self.sigma_d, self.P_mean, self.P_std = float(sigma_d), float(P_mean), float(P_std)
        self.batch_size, self.guidance_range = int(batch_size), tuple(guidance_range)
        self.warmup_steps, self.lr, self.lr_ref_nimg = int(warmup_steps), lr, lr_ref_kimg * 1e3
        self.autocast = autocast
        self.params = [*net.parameters(), *([] if head is None else head.parameters())]
        self.weights = [p for p in self.params if p.ndim >= 2]  # forced weight normalisation
        device = self.params[0].device
        self.optimizer = torch.optim.Adam(
            self.params, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda"
        )
        self.gammas = [power_exponent(s) for s in power_std]
        net_params = list(net.parameters())
        self.emas = [[p.detach().clone() for p in net_params] for _ in self.gammas]
        self.net_params = net_params
        self.step_count = 0  # host-side: the learning rate and EMA decays are Python floats
        self.step_t = torch.zeros((), device=device)  # device-side: r = min(1, step / H)
        options = dict(loss_options or {})
        head_ = head

        def loss_fn(x0, z, t, r, labels, guidance):
            return scd_loss(net, head_, self.teacher, x0, z, t, r, sigma_d=self.sigma_d,
                            labels=labels, guidance=guidance, **options)[0]  # fmt: skip

        self.eager_loss_fn: Callable[..., Tensor] = loss_fn
        self.loss_fn: Callable[..., Tensor] = (
            torch.compile(loss_fn, **(compile_options or {})) if compile else loss_fn
        )

    def draw(self, x0: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """z ``(B, ...)``, t ``(B,)`` and the guidance scales ``(B,)`` (or None) of one step."""
        b = x0.shape[0]
        z = self.sigma_d * torch.randn_like(x0)
        tau = self.P_mean + self.P_std * torch.randn(b, device=x0.device, dtype=x0.dtype)
        t = torch.atan(torch.exp(tau) / self.sigma_d)
        s = None
        if getattr(self.net, "guidance_input", False):
            lo, hi = self.guidance_range
            s = lo + (hi - lo) * torch.rand(b, device=x0.device, dtype=x0.dtype)
        return z, t, s

    def __call__(self, x0: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        z, t, s = self.draw(x0)
        if self.warmup_steps > 0:
            r = torch.clamp(self.step_t / self.warmup_steps, max=1.0)
        else:
            r = torch.ones_like(self.step_t)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x0.device.type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):  # fmt: skip
            loss = self.loss_fn(x0, z, t, r, labels, s)
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        nimg = self.step_count * self.batch_size  # before this step, as optim.learning_rate
        lr = self.lr
        if self.lr_ref_nimg > 0:
            lr = lr / math.sqrt(max(nimg / self.lr_ref_nimg, 1.0))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            for w in self.weights:  # EDM2 Eq. 66: unit RMS per output channel
                dims = tuple(range(1, w.ndim))
                rms = w.square().mean(dim=dims, keepdim=True).sqrt()
                w.div_(rms.clamp_min(torch.finfo(w.dtype).tiny))
            nimg += self.batch_size
            for gamma, ema in zip(self.gammas, self.emas, strict=True):
                beta = max(1.0 - self.batch_size / max(nimg, self.batch_size), 0.0) ** (gamma + 1)
                torch._foreach_lerp_(ema, self.net_params, 1.0 - beta)
        self.step_count += 1
        self.step_t += 1
        return loss.detach(), grad_norm

    @classmethod
    def from_config(
        cls, config: Any, net: nn.Module, head: nn.Module | None, teacher: nn.Module, **kwargs: Any
    ) -> SCDStep:
        """The step with a resolved config's options (as ``scm_jax.train.aot.
        train_step_from_config``: trigflow, loss, teacher guidance range, optim, ema, batch_size;
        ``loss.adaptive_weighting=False`` drops ``head``); ``kwargs``: ``autocast``, ``compile``...

        Raises:
          ValueError: options this reference does not implement (another optimiser, gradient
            clipping, a learning-rate ramp-up, a half-life EMA).
        """
        from scm_jax.config.durations import resolve_durations

        config = resolve_durations(config)  # the warm-up in steps, the EMA half-life in kimg
        o, lo = config.optim, config.loss
        if o.name != "adam" or o.grad_clip > 0 or o.lr_rampup_kimg > 0:
            raise ValueError("the PyTorch sCD step implements Adam without gradient clipping or "
                             f"ramp-up, not optim={dict(o)}")  # fmt: skip
        if config.ema.halflife_kimg > 0:
            raise ValueError("the PyTorch sCD step keeps power-function EMAs only, not a "
                             "half-life EMA (ema.halflife_kimg > 0)")  # fmt: skip
        return cls(
            net, head if lo.adaptive_weighting else None, teacher,
            sigma_d=config.trigflow.sigma_d, P_mean=config.trigflow.P_mean,
            P_std=config.trigflow.P_std, batch_size=config.batch_size,
            guidance_range=(config.teacher.guidance_min, config.teacher.guidance_max),
            warmup_steps=lo.tangent_warmup_steps, loss_options=loss_options(config),
            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, lr_ref_kimg=o.lr_ref_kimg,
            power_std=tuple(config.ema.power_std), **kwargs,
        )  # fmt: skip


def loss_options(config: Any) -> dict[str, Any]:
    """:func:`scd_loss`'s options of a resolved config's ``loss`` section."""
    lo = config.loss
    return {"warmup_form": lo.warmup_form, "tangent_norm": lo.tangent_norm,
            "tangent_c": lo.tangent_c, "mask_nonfinite": lo.mask_nonfinite}  # fmt: skip
