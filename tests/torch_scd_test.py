"""The PyTorch sCD reference (scm_jax.torch.scd, the peer benchmark's step) and the weighting
head's twin (scm_jax.torch.weighting): float32 parity with the JAX loss, its gradient and w_phi;
the training step's bookkeeping."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SIGMA_D, randomize

from scm_jax import bench
from scm_jax.losses import scd_loss
from scm_jax.networks import build_network
from scm_jax.run.state_dict import to_state_dict

torch = pytest.importorskip("torch", reason="needs PyTorch (pip install 'scm-jax[torch]')")
scm_torch = pytest.importorskip("scm_jax.torch")
from scm_jax.torch import scd as tscd  # noqa: E402
from scm_jax.torch.weighting import build_weight_head  # noqa: E402

STUDENT = dict(
    arch="edm2_unet", img_resolution=8, img_channels=3, num_classes=5, model_channels=8,
    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=8,
    guidance_input=True, sigma_d=SIGMA_D, weight_channels=16,
)  # fmt: skip
TEACHER = {**STUDENT, "guidance_input": False}


def _state(params):
    return {k: torch.from_numpy(np.array(v)) for k, v in to_state_dict(params).items()}


def _pair(cfg, seed):
    """(JAX NetworkDef, random non-trivial params {'net', 'weight'}, torch net, torch head)."""
    nd = build_network(cfg)
    params = randomize(nd.init(jax.random.key(seed)), seed + 1)
    net = scm_torch.build_network(cfg)
    net.load_state_dict(_state(params["net"]))
    head = build_weight_head(cfg)
    head.load_state_dict(_state(params["weight"]))
    return nd, params, net, head


@pytest.mark.parametrize(
    "over",
    [{}, {"time_embedding": "fourier", "c_noise_mode": "edm"},
     {"time_embedding": "edm2_fourier", "c_noise_scale": 2.0}],
)  # fmt: skip
def test_weight_head_equals_jax(over):
    cfg = {**STUDENT, **over}
    nd, params, _, head = _pair(cfg, 0)
    t = np.linspace(0.05, 1.55, 7).astype(np.float32)
    w_jax = np.asarray(nd.weight_fn(params["weight"], jnp.asarray(t)))
    w_torch = head(torch.from_numpy(t)).detach().numpy()
    assert np.abs(w_jax).max() > 0.1
    np.testing.assert_allclose(w_torch, w_jax, atol=1e-5, rtol=1e-5)


def _inputs(b=4, seed=0):
    rng = np.random.default_rng(seed)
    x0, z = (0.5 * rng.standard_normal((b, 8, 8, 3)).astype(np.float32) for _ in "xz")
    t = np.linspace(0.05, 1.5, b).astype(np.float32)
    y = np.array([0, 3, -1, 4][:b], np.int32)
    s = np.linspace(1.0, 2.0, b).astype(np.float32)
    return x0, z, t, y, s


@pytest.mark.parametrize(
    "case",
    [{"guided": True},
     pytest.param({"guided": False}, marks=pytest.mark.slow),
     pytest.param({"guided": True, "warmup_form": "rcm", "tangent_norm": "rms",
                   "weighted": False}, marks=pytest.mark.slow)],
)  # fmt: skip
def test_scd_loss_and_gradient_equal_jax(case):
    """Same parameters, x0, z, t, labels, CFG scales and r: the same loss and gradient."""
    case = dict(case)
    guided, weighted = case.pop("guided"), case.pop("weighted", True)
    cfg = {**STUDENT, "guidance_input": guided}
    nd, params, net, head = _pair(cfg, 1)
    t_nd, t_params, teacher, _ = _pair(TEACHER, 3)
    x0, z, t, y, s = _inputs()
    s = s if guided else None
    step, H = 3, 4  # r = 0.75
    opts = {"warmup_form": "scm", "tangent_norm": "l2", "tangent_c": 0.1, **case}

    def loss(p):
        return scd_loss(nd.apply_fn, nd.weight_fn if weighted else None, p, t_nd.apply_fn,
                        t_params["net"], x0, z, t, sigma_d=SIGMA_D, step=step, labels=y,
                        guidance=s, warmup_steps=H, **opts)[0]  # fmt: skip

    l_jax, g_jax = jax.jit(jax.value_and_grad(loss))(params)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    l_torch, aux = tscd.scd_loss(
        net, head if weighted else None, teacher, nchw(x0), nchw(z), torch.from_numpy(t),
        torch.tensor(step / H), sigma_d=SIGMA_D, labels=torch.from_numpy(y).long(),
        guidance=None if s is None else torch.from_numpy(s), **opts,
    )  # fmt: skip
    l_torch.backward()
    assert float(l_torch.detach()) == pytest.approx(float(l_jax), rel=1e-5)
    assert bool(aux["finite"].all())
    named = {**{f"net.{k}": v for k, v in to_state_dict(g_jax["net"]).items()},
             **{f"weight.{k}": v for k, v in to_state_dict(g_jax["weight"]).items()}}  # fmt: skip
    mods = {"net": net, "weight": head} if weighted else {"net": net}
    grads = {f"{m}.{k}": p.grad.numpy() for m, mod in mods.items()
             for k, p in mod.named_parameters()}  # fmt: skip
    assert len(grads) > 20
    diff = math.sqrt(sum(((named[k] - g) ** 2).sum() for k, g in grads.items()))
    norm = math.sqrt(sum((named[k] ** 2).sum() for k in grads))
    assert norm > 0 and diff / norm < 1e-4


def _step(autocast=None, **kwargs):
    cfg = bench.suite_config("smoke", "scd_cfg", dtype="float32", batch_size=4, dropout=0.0)
    mc = dict(cfg.model)
    net, teacher = scm_torch.build_network(mc), scm_torch.build_network({**mc, **{
        "guidance_input": False}})  # fmt: skip
    return cfg, tscd.SCDStep.from_config(cfg, net, build_weight_head(mc), teacher,
                                         autocast=autocast, **kwargs)  # fmt: skip


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_scd_step_updates_weights_and_emas(autocast):
    cfg, step = _step(autocast)
    torch.manual_seed(0)
    x0, labels = 0.5 * torch.randn(4, 4, 16, 16), torch.arange(4)
    before = [p.detach().clone() for p in step.net_params]
    for _ in range(2):
        loss, grad_norm = step(x0, labels)
        assert torch.isfinite(loss) and torch.isfinite(grad_norm) and float(grad_norm) > 0
    assert step.step_count == 2 and float(step.step_t) == 2
    assert all(p.dtype == torch.float32 for p in step.params)  # master weights
    changed = [not torch.equal(b, p) for b, p in zip(before, step.net_params, strict=True)]
    assert sum(changed) > len(changed) // 2
    for w in step.weights:  # forced weight normalisation: unit RMS per output channel
        rms = w.detach().square().mean(dim=tuple(range(1, w.ndim))).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-5)
    # Power-function EMAs: beta = 0 at the first update, so after two they lie between the
    # parameters after step 1 and step 2; sigma_rel 0.05 and 0.10 give different averages.
    assert len(step.emas) == len(cfg.ema.power_std) == 2
    assert not all(torch.equal(a, b) for a, b in zip(*step.emas, strict=True))


def test_scd_step_refuses_options_it_does_not_implement():
    cfg, _ = _step()
    with cfg.unlocked():
        cfg.optim.grad_clip = 1.0
    with pytest.raises(ValueError, match="clipping"):
        tscd.SCDStep.from_config(cfg, *(scm_torch.build_network(dict(cfg.model)),) * 3)


@pytest.mark.slow
def test_compiled_scd_loss_equals_eager():
    """torch.compile captures the loss with torch.func.jvp (aot_eager: no code generation)."""
    _, step = _step(compile=True, compile_options={"backend": "aot_eager"})
    x0, labels = 0.5 * torch.randn(4, 4, 16, 16), torch.arange(4)
    torch.manual_seed(1)
    z, t, s = step.draw(x0)
    r = torch.tensor(0.5)
    eager = step.eager_loss_fn(x0, z, t, r, labels, s)
    compiled = step.loss_fn(x0, z, t, r, labels, s)
    assert float(compiled.detach()) == pytest.approx(float(eager.detach()), rel=1e-5)
