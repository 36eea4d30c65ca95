"""Serialized StableHLO of the network and the 1- and 2-step samplers (``jax.export``).

Each function is exported for ``platforms=('cpu', 'cuda', 'tpu')`` with a symbolic batch ``b`` and
takes the weights as its first argument, as the export's safetensors file holds them (a dict of
PyTorch-named, PyTorch-laid-out arrays; the function transposes them itself), so serving needs
``jax``, ``safetensors`` and the files, not this package::

    import numpy as np, safetensors.numpy
    from jax import export
    sample = export.deserialize(open("out/sample_2step.stablehlo", "rb").read())
    state = safetensors.numpy.load_file("out/model.safetensors")
    noise = np.random.default_rng(0).standard_normal((2, 16, 32, 32, 3), np.float32)
    x0 = sample.call(state, noise, labels)         # (16, 32, 32, 3), NHWC, not clipped

Inputs (JAX layouts, channels-last): ``noise`` float32 ``(steps, b, *sample_shape)`` standard
normal (``noise[0]`` starts the chain, ``noise[i]`` re-noises after step i - 1; the draws of the
JAX sampler for a key are :func:`consistency_noise`), then ``labels`` int32 ``(b,)`` (-1 = null)
if the model is class-conditional, then ``guidance`` float32 ``(b,)`` if it has a guidance input.
``network.stablehlo`` is F_theta(state, x_scaled, t[, labels][, guidance]). Noise is an input, not
a key, so that the same draws drive the JAX, PyTorch, ONNX and StableHLO samplers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import sampling, trigflow
from scm_jax.data.scale import DataScale
from scm_jax.networks import NetworkDef

Array = jax.Array
PLATFORMS = ("cpu", "cuda", "tpu")


def params_from_state(state: Mapping[str, Array]) -> dict[str, Any]:
    """The Flax parameter tree of a PyTorch-layout state dict, inside a traced function
    (the inverse of ``scm_jax.run.state_dict.to_state_dict``; transpositions only)."""
    out: dict[str, Any] = {}
    for name, a in state.items():
        *parents, last = name.split(".")
        if last == "weight" and a.ndim == 4:
            a = jnp.transpose(a, (2, 3, 1, 0))  # OIHW -> HWIO
        elif last == "weight" and a.ndim == 2:
            a = a.T
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = a
    return out


def consistency_noise(key: Array, shape: tuple[int, ...], steps: int, dtype: Any = jnp.float32):
    """The standard normals ``(steps, *shape)`` that ``sampling.sample_consistency`` draws from
    ``key`` (x_{t_0} = sigma_d noise[0]; the re-noising after step i uses noise[i + 1])."""
    k_init, k_steps = jax.random.split(key)
    keys = jax.random.split(k_steps, steps)
    draws = [jax.random.normal(k_init, shape, dtype)]
    draws += [jax.random.normal(keys[i], shape, dtype) for i in range(steps - 1)]
    return jnp.stack(draws)


def make_network_fn(nd: NetworkDef) -> Callable[..., Array]:
    """``F(state, x_scaled, t[, labels][, guidance])`` in evaluation mode."""

    def network(state, x_scaled, t, *cond):
        labels, guidance = _split_cond(nd, cond)
        return nd.apply_fn(params_from_state(state), x_scaled, t, labels, guidance)

    return network


def make_sampler_fn(
    nd: NetworkDef, times: tuple[float, ...], sigma_d: float, scale: DataScale | None = None
) -> Callable[..., Array]:
    """``sample(state, noise[, labels][, guidance]) -> x0``: consistency sampling at ``times``
    (``sampling.sample_consistency`` with the noise given instead of drawn), returned in data
    units by ``scale.decode`` (None: model units)."""
    times = tuple(float(t) for t in times)
    scale = scale or DataScale(sigma_d=sigma_d)

    def sample(state, noise, *cond):
        labels, guidance = _split_cond(nd, cond)
        params = params_from_state(state)
        b = noise.shape[1]
        x = sigma_d * noise[0]
        for i, t in enumerate(times):
            tb = jnp.broadcast_to(jnp.asarray(t, noise.dtype), (b,))
            F = nd.apply_fn(params, x / sigma_d, tb, labels, guidance)
            x = trigflow.consistency_fn(x, tb, F, sigma_d)
            if i + 1 < len(times):
                x = trigflow.add_noise(x, sigma_d * noise[i + 1], times[i + 1])
        return scale.decode(x)

    return sample


def _split_cond(nd: NetworkDef, cond: tuple[Array, ...]) -> tuple[Array | None, Array | None]:
    cond = list(cond)
    labels = cond.pop(0) if nd.num_classes else None
    guidance = cond.pop(0) if nd.guidance_input else None
    return labels, guidance


def _cond_specs(nd: NetworkDef, b: Any) -> list[jax.ShapeDtypeStruct]:
    specs = []
    if nd.num_classes:
        specs.append(jax.ShapeDtypeStruct((b,), jnp.int32))
    if nd.guidance_input:
        specs.append(jax.ShapeDtypeStruct((b,), jnp.float32))
    return specs


def state_specs(state: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract shapes of a state dict (what the exported functions take as weights)."""
    return {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in state.items()}


def export_network(
    nd: NetworkDef, state: Mapping[str, Any], platforms: tuple[str, ...] = PLATFORMS
) -> jax.export.Exported:
    """``jax.export`` of F_theta with a symbolic batch."""
    (b,) = jax.export.symbolic_shape("b")
    args = (
        state_specs(state),
        jax.ShapeDtypeStruct((b, *nd.sample_shape), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.float32),
        *_cond_specs(nd, b),
    )
    return jax.export.export(jax.jit(make_network_fn(nd)), platforms=platforms)(*args)


def export_sampler(
    nd: NetworkDef,
    state: Mapping[str, Any],
    steps: int,
    *,
    sigma_d: float,
    t_max: float,
    t_mid: float,
    scale: DataScale | None = None,
    platforms: tuple[str, ...] = PLATFORMS,
) -> jax.export.Exported:
    """``jax.export`` of the ``steps``-step consistency sampler with a symbolic batch; samples
    in data units by ``scale`` (an export's ``data_scale``; None: model units)."""
    times = sampling.consistency_times(steps, t_max, t_mid)
    (b,) = jax.export.symbolic_shape("b")
    args = (
        state_specs(state),
        jax.ShapeDtypeStruct((steps, b, *nd.sample_shape), jnp.float32),
        *_cond_specs(nd, b),
    )
    fn = make_sampler_fn(nd, times, sigma_d, scale)
    return jax.export.export(jax.jit(fn), platforms=platforms)(*args)


def serialize(exported: jax.export.Exported) -> bytes:
    """``Exported.serialize()``, with a clear message where ``flatbuffers`` is missing."""
    try:
        return bytes(exported.serialize())
    except ImportError as e:
        raise ImportError(
            f"serializing StableHLO needs flatbuffers: pip install 'scm-jax[export]' ({e})"
        ) from None


def deserialize(data: bytes) -> jax.export.Exported:
    """``jax.export.deserialize`` with one clear error for a damaged file."""
    try:
        return jax.export.deserialize(bytearray(data))
    except ImportError as e:
        raise ImportError(
            f"reading StableHLO needs flatbuffers: pip install flatbuffers ({e})"
        ) from None
    except Exception as e:
        raise ValueError(f"not a serialized jax.export function ({type(e).__name__})") from None
