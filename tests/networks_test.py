"""The EDM2-style sCM network: JVP exactness, weight normalisation, conditioning and errors."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SIGMA_D, randomize, tiny_unet

from scm_jax.networks import MPConv, build_network, project_weights
from scm_jax.networks.edm2_unet import Block


@pytest.mark.parametrize(
    "conditioning",
    [
        {},  # sCM: positional embedding of c_noise = t, ADN
        {"time_embedding": "fourier", "c_noise_mode": "edm", "modulation": "mul"},  # stock EDM2
    ],
)
def test_jvp_matches_central_finite_differences_float64(conditioning, x64):
    nd = tiny_unet(param_dtype="float64", **conditioning)
    params = randomize(nd.init(jax.random.key(0)), 1)
    kx, kt, kdx, kdt = jax.random.split(jax.random.key(2), 4)
    b = 3
    x_t = SIGMA_D * jax.random.normal(kx, (b, 8, 8, 3), jnp.float64)
    t = jax.random.uniform(kt, (b,), jnp.float64, 0.2, 1.4)
    labels = jnp.array([0, 4, -1])  # includes the null label
    guidance = jnp.array([1.0, 1.5, 2.0], jnp.float64)
    dx = jax.random.normal(kdx, x_t.shape, jnp.float64)
    dt = jax.random.uniform(kdt, (b,), jnp.float64, 0.5, 1.5)

    def apply(p, x_t, t):  # exactly the form the objectives differentiate: F(x_t / sigma_d, t)
        return nd.net.apply({"params": p["net"]}, x_t / SIGMA_D, t, labels, guidance)

    F = jax.jit(apply)  # parameters are arguments (closed-over arrays become XLA constants)
    jvp = jax.jit(lambda p, x, t, dx, dt: jax.jvp(lambda x, t: apply(p, x, t), (x, t), (dx, dt)))
    primal, tangent = jvp(params, x_t, t, dx, dt)
    np.testing.assert_allclose(primal, F(params, x_t, t), rtol=1e-9, atol=1e-12)
    h = 1e-5
    fd = (F(params, x_t + h * dx, t + h * dt) - F(params, x_t - h * dx, t - h * dt)) / (2 * h)
    rel = float(jnp.linalg.norm(tangent - fd) / jnp.linalg.norm(fd))
    assert float(jnp.linalg.norm(fd)) > 1e-3  # a non-trivial derivative
    assert rel < 1e-5, rel


def test_jvp_in_float32_under_jit():
    nd = tiny_unet()
    params = randomize(nd.init(jax.random.key(0)), 1)
    x = jnp.ones((2, 8, 8, 3))
    t = jnp.array([0.3, 1.2])

    @jax.jit
    def jvp(p, x, t):
        f = lambda x, t: nd.net.apply({"params": p["net"]}, x, t, jnp.array([1, 2]), 1.5)
        return jax.jvp(f, (x, t), (x, jnp.ones_like(t)))

    F, dF = jvp(params, x, t)
    assert F.shape == dF.shape == x.shape and F.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(dF)))


def test_weight_projection_is_idempotent_and_applied_at_init():
    nd = tiny_unet()
    params = nd.init(jax.random.key(0))
    w = params["net"]["enc_8x8_conv"]["weight"]  # (3, 3, C_in, C_out), projected at init
    rms = jnp.sqrt(jnp.mean(w**2, axis=(0, 1, 2)))
    np.testing.assert_allclose(rms, 1.0, rtol=1e-3)
    raw = randomize(params, 3, scale=2.0)
    once = project_weights(raw)
    twice = project_weights(once)
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Gains are not weights: left alone.
    assert float(once["net"]["out_gain"]) == float(raw["net"]["out_gain"])
    # The forward normalises too: projecting changes the function only through EDM2's epsilon
    # (w / (eps + rms(w)): ~1e-4 relative per layer).
    x, t = jnp.ones((1, 8, 8, 3)), jnp.array([0.7])
    f = jax.jit(lambda p: nd.net.apply({"params": p["net"]}, x, t, jnp.array([1]), 1.0))
    np.testing.assert_allclose(f(raw), f(once), rtol=3e-3, atol=3e-3)


@pytest.mark.parametrize("kernel", [(), (3, 3), (1, 1)])
def test_mpconv_preserves_unit_variance_at_init(kernel):
    shape = (512, 64) if not kernel else (16, 16, 16, 64)
    x = jax.random.normal(jax.random.key(0), shape)
    layer = MPConv(96, kernel)
    params = jax.jit(layer.init)(jax.random.key(1), x)
    y = jax.jit(layer.apply)(params, x)
    assert abs(float(y.std()) - 1.0) < 0.05


@pytest.mark.parametrize("modulation", ["adn", "mul", "adagn"])
def test_block_is_magnitude_preserving_at_init(modulation):
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 64))
    emb = jax.random.normal(jax.random.key(1), (8, 128))
    block = Block(64, attention=True, modulation=modulation)
    variables = jax.jit(block.init)(jax.random.key(2), x, emb)
    y = jax.jit(block.apply)(project_weights(variables), x, emb)
    assert 0.7 < float(y.std()) < 1.3


def test_label_dropout_null_label_and_dropout_resolution():
    nd = tiny_unet(label_dropout=0.5, dropout=0.5, dropout_max_res=4)
    params = randomize(nd.init(jax.random.key(0)), 1)
    x = jax.random.normal(jax.random.key(2), (16, 8, 8, 3))
    t = jnp.full((16,), 0.8)

    def forward(net, p, labels, train, rng):  # parameters are jit arguments, not constants
        return net.apply({"params": p["net"]}, x, t, labels, jnp.ones(16), train=train,
                         rngs={"dropout": jax.random.key(rng)})  # fmt: skip

    fwd = jax.jit(forward, static_argnums=(0, 3))
    apply = lambda labels, train=False, rng=0: fwd(nd.net, params, labels, train, rng)
    uncond = apply(None)
    np.testing.assert_allclose(apply(jnp.full((16,), -1)), uncond, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply(jnp.zeros((16, 5))), uncond, rtol=1e-5, atol=1e-6)
    labels = jnp.arange(16) % 5
    assert not np.allclose(apply(labels), uncond)
    assert not np.allclose(apply(labels, True, 0), apply(labels, True, 1))
    # No block sits at a resolution <= 0 and there is no label dropout: train == eval.
    nd0 = tiny_unet(dropout=0.5, dropout_max_res=0)
    p0 = randomize(nd0.init(jax.random.key(0)), 1)
    np.testing.assert_allclose(
        fwd(nd0.net, p0, labels, True, 5), fwd(nd0.net, p0, labels, False, 5), rtol=1e-6
    )


def test_bfloat16_compute_tracks_float32():
    nd32 = tiny_unet()
    nd16 = tiny_unet(dtype="bfloat16")
    params = randomize(nd32.init(jax.random.key(0)), 1)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    args = (x, jnp.linspace(0.2, 1.4, 4), jnp.arange(4), jnp.ones(4))
    f32 = jax.jit(nd32.net.apply)({"params": params["net"]}, *args)
    f16 = jax.jit(nd16.net.apply)({"params": params["net"]}, *args)
    assert f16.dtype == jnp.float32  # output follows the input dtype
    assert float(jnp.linalg.norm(f16 - f32) / jnp.linalg.norm(f32)) < 0.05


def test_mlp_network_and_weight_head():
    nd = build_network(dict(arch="mlp", data_dim=2, hidden=32, depth=2, emb_channels=16,
                            num_classes=3, guidance_input=False))  # fmt: skip
    params = randomize(nd.init(jax.random.key(0)), 1)
    x, t = jnp.ones((5, 2)), jnp.linspace(0.1, 1.5, 5)
    f = lambda p, x, t: nd.net.apply({"params": p["net"]}, x, t, jnp.arange(5) % 3)
    jvp = jax.jit(lambda p, x, t: jax.jvp(lambda x, t: f(p, x, t), (x, t), (x, jnp.ones(5))))
    F, dF = jvp(params, x, t)
    assert F.shape == dF.shape == (5, 2)
    w = jax.jit(nd.weight_head.apply)({"params": params["weight"]}, t)
    assert w.shape == (5,) and bool(jnp.all(jnp.isfinite(w)))


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"img_resolution": 10, "channel_mult": (1, 2, 2)}, "img_resolution=10 is not divisible"),
        ({"attn_resolutions": (3,)}, "attention resolution 3"),
        ({"modulation": "film"}, "unknown modulation 'film'"),
        ({"time_embedding": "learned"}, "unknown time_embedding 'learned'"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"bogus_option": 3}, r"unknown model option\(s\) \['bogus_option'\]"),
        ({"arch": "dit"}, "unknown model.arch 'dit'"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ],
)
def test_bad_network_config_names_the_value(over, match):
    with pytest.raises(ValueError, match=match):
        tiny_unet(**over)


def test_bad_inputs_name_the_value():
    nd = tiny_unet()
    params = nd.init(jax.random.key(0))
    apply = lambda *a: jax.jit(nd.net.apply)({"params": params["net"]}, *a)
    x, t, y, s = jnp.ones((2, 8, 8, 3)), jnp.ones(2), jnp.array([0, 1]), jnp.ones(2)
    with pytest.raises(
        ValueError, match=r"expected input of shape \(B, 8, 8, 3\), got \(2, 16, 16, 3\)"
    ):
        apply(jnp.ones((2, 16, 16, 3)), t, y, s)
    with pytest.raises(TypeError, match="expected a float input"):
        apply(jnp.ones((2, 8, 8, 3), jnp.int32), t, y, s)
    with pytest.raises(
        ValueError, match=r"time t must be a scalar or have shape \(2,\), got \(3,\)"
    ):
        apply(x, jnp.ones(3), y, s)
    with pytest.raises(ValueError, match=r"integer labels must have shape \(2,\)"):
        apply(x, t, jnp.array([[0, 1]]), s)
    with pytest.raises(ValueError, match="pass guidance="):
        apply(x, t, y)
    nd_plain = tiny_unet(guidance_input=False, num_classes=0)
    p_plain = nd_plain.init(jax.random.key(0))
    with pytest.raises(ValueError, match="no guidance input"):
        jax.jit(nd_plain.net.apply)({"params": p_plain["net"]}, x, t, None, s)
    with pytest.raises(ValueError, match="unconditional"):
        jax.jit(nd_plain.net.apply)({"params": p_plain["net"]}, x, t, y)


def test_module_is_plain_flax():
    assert isinstance(tiny_unet().net, nn.Module)
    assert math.isclose(SIGMA_D, tiny_unet().net.sigma_d)


def test_conv_implementations_agree_in_value_gradient_and_jvp(x64):
    """conv2d_same's 'matmul_dw' (CPU default) is the same function as 'xla', in every mode."""
    from scm_jax.networks.layers import conv2d_same

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 3)))
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)))
    dx, dw = jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=w.shape))
    ref, new = (
        (lambda x, w: conv2d_same(x, w, "xla")),
        (lambda x, w: conv2d_same(x, w, "matmul_dw")),
    )
    np.testing.assert_allclose(new(x, w), ref(x, w), rtol=1e-12)
    for argnums in (0, 1, (0, 1)):
        g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) ** 2), argnums)(x, w)
        g_new = jax.grad(lambda x, w: jnp.sum(new(x, w) ** 2), argnums)(x, w)
        for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10)
    np.testing.assert_allclose(jax.jvp(new, (x, w), (dx, dw))[1], jax.jvp(ref, (x, w), (dx, dw))[1],
                               rtol=1e-10)  # fmt: skip
    # x-only tangents (sCM's JVP pass: the weights are closed over, their tangent is zero)
    jvp_new = jax.jvp(lambda x: new(x, w), (x,), (dx,))[1]
    np.testing.assert_allclose(jvp_new, jax.jvp(lambda x: ref(x, w), (x,), (dx,))[1], rtol=1e-10)
    with pytest.raises(ValueError, match="unknown conv impl"):
        conv2d_same(x, w, "fft")
