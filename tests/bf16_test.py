"""The JVP term in bfloat16 with the paper's rearrangement, against float32 (docs/method.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers import SIGMA_D, randomize, tiny_unet

from scm_jax import trigflow
from scm_jax.losses import tangent_jvp

# Measured with this test's setting (tiny U-Net, 8 samples, t in [0.01, 1.56]); see docs/method.md.
BF16_JVP_REL_ERROR_BOUND = 0.05


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_bf16_jvp_term_tracks_float32():
    f32, bf16 = tiny_unet(), tiny_unet(dtype="bfloat16")
    params = randomize(f32.init(jax.random.key(0)), 1)["net"]
    k0, k1 = jax.random.split(jax.random.key(3))
    x0 = SIGMA_D * jax.random.normal(k0, (8, 8, 8, 3))
    z = SIGMA_D * jax.random.normal(k1, (8, 8, 8, 3))
    t = jnp.array([0.01, 0.1, 0.4, 0.8, 1.1, 1.4, 1.5, 1.56])
    x_t, dx_dt = trigflow.add_noise(x0, z, t), trigflow.velocity_target(x0, z, t)
    labels, scales = jnp.arange(8) % 5, jnp.linspace(1.0, 2.0, 8)

    @jax.jit
    def J(p):
        out = {}
        for name, nd in (("f32", f32), ("bf16", bf16)):
            out[name] = tangent_jvp(
                nd.apply_fn, p, x_t, t, dx_dt, sigma_d=SIGMA_D, labels=labels, guidance=scales
            )[1]
        return out

    out = J(params)
    err = rel(out["bf16"], out["f32"])
    print(f"bf16 JVP term relative L2 error vs float32: {err:.4f}")
    assert np.isfinite(err) and err < BF16_JVP_REL_ERROR_BOUND


def test_bf16_policy_of_the_train_step():
    """model.dtype='bfloat16': the sCD-CFG step's products (teacher, JVP, forward, backward) run
    in bf16, while parameters, optimizer state, EMAs and gradients stay float32."""
    import jax.numpy as jnp

    from scm_jax import bench
    from scm_jax.flops import flops_by_dtype
    from scm_jax.networks import build_network
    from scm_jax.optim import make_optimizer
    from scm_jax.train import build

    cfg = bench.suite_config("smoke", "scd_cfg", dtype="bfloat16", batch_size=2)
    nd = build_network(cfg.model)
    tx, _ = make_optimizer(**cfg.optim, batch_size=cfg.batch_size)
    teacher_fn, teacher = build.abstract_teacher(cfg)
    step = build.train_step_from_config(cfg, nd, teacher_fn, tx=tx)
    state = build.abstract_train_state(cfg, nd, tx)
    args = (state, jax.ShapeDtypeStruct((2, *nd.sample_shape), jnp.float32),
            jax.ShapeDtypeStruct((2,), jnp.int32), teacher)  # fmt: skip
    by_dtype = flops_by_dtype(step, *args)
    # Only the weighting head w_phi(t) stays float32 (~1 kFLOP of ~0.6 GFLOP).
    assert by_dtype["bfloat16"] / sum(by_dtype.values()) > 0.999, by_dtype
    new_state, _ = jax.eval_shape(step, *args)
    for tree in (new_state.params, new_state.opt_state, new_state.emas):
        assert {a.dtype for a in jax.tree.leaves(tree) if a.ndim} == {jnp.dtype(jnp.float32)}
