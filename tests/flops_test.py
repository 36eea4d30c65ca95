"""The jaxpr FLOP counter on programs whose cost is known by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scm_jax.flops import count_flops

f32 = jnp.float32


def test_matmul_conv_attention_and_nesting():
    x, w = jax.ShapeDtypeStruct((4, 8), f32), jax.ShapeDtypeStruct((8, 16), f32)
    assert count_flops(jnp.matmul, x, w) == 2 * 4 * 8 * 16

    img, k = jax.ShapeDtypeStruct((2, 8, 8, 3), f32), jax.ShapeDtypeStruct((3, 3, 3, 5), f32)
    conv = lambda a, b: jax.lax.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert count_flops(conv, img, k) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)

    q = jax.ShapeDtypeStruct((2, 16, 4, 8), f32)  # (B, L, heads, C)
    attn = lambda q: jnp.einsum("bqhc,bkhc->bhqk", q, q)
    assert count_flops(attn, q) == 2 * 2 * 4 * 16 * 16 * 8

    nested = jax.jit(lambda x, w: jnp.matmul(jax.jit(jnp.matmul)(x, w), w.T))
    assert count_flops(nested, x, w) == 2 * (2 * 4 * 8 * 16)

    def scanned(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w @ w.T), None), x, None, length=3)[0]

    assert count_flops(scanned, x, w) == 3 * 2 * (2 * 4 * 8 * 16)


def test_jvp_with_closed_over_weights_costs_one_extra_product():
    x, w = jax.ShapeDtypeStruct((4, 8), f32), jax.ShapeDtypeStruct((8, 16), f32)
    fwd = lambda w, x: jnp.tanh(x @ w)
    jvp = lambda w, x, dx: jax.jvp(lambda x: fwd(w, x), (x,), (dx,))
    assert count_flops(jvp, w, x, x) == 2 * count_flops(fwd, w, x)
    grad = jax.grad(lambda w, x: fwd(w, x).sum())  # backward: dW only (x is not differentiated)
    assert count_flops(grad, w, x) == 2 * count_flops(fwd, w, x)
