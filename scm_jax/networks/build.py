"""``build_network``: a config's ``model`` section becomes a :class:`NetworkDef`.

This is the one place where the ``model`` section becomes plain constructor arguments; the modules
themselves never see a config. :class:`NetworkDef` bundles F_theta, the weighting head w_phi and
the shapes callers need, and initialises parameters already projected to unit RMS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scm_jax.networks.edm2_unet import EDM2UNet
from scm_jax.networks.embeddings import FOURIER_PARAMS, fourier_constants
from scm_jax.networks.layers import project_weights
from scm_jax.networks.mlp import MLPNet
from scm_jax.networks.weighting import AdaptiveWeight

ARCHS = {"edm2_unet": EDM2UNet, "mlp": MLPNet}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
           "float64": jnp.float64}  # fmt: skip
# Keys of the model section that are not constructor arguments of the network.
_NON_NET_KEYS = ("arch", "size", "weight_channels", "dtype", "param_dtype", "remat")
# Activation rematerialisation (``model.remat``), what the backward pass keeps of a forward:
# 'none': every activation; 'block' (edm2_unet): each U-Net block's inputs only, the block is
# recomputed; 'full': only the network's inputs, the whole forward is recomputed (U-Net: with its
# blocks rematerialised inside, so the recomputation keeps block inputs only).
REMAT_POLICIES = ("none", "block", "full")


@dataclasses.dataclass(frozen=True)
class NetworkDef:
    """A built network: F_theta, the weighting head w_phi, and what callers need to feed them.

    Attributes:
      net: Flax module F_theta(x / sigma_d, t, labels=None, guidance=None, train=False).
      weight_head: Flax module w_phi(t) -> ``(B,)``.
      sample_shape: shape of one sample, ``(R, R, C)`` or ``(D,)``.
      num_classes: K (0: unconditional).
      guidance_input: whether ``net`` takes a guidance scale.
      param_dtype: dtype of stored parameters.
      remat: one of ``REMAT_POLICIES``; ``'full'`` wraps :meth:`apply_fn` in ``jax.checkpoint``
        (``'block'`` lives in the module itself).
    """

    net: nn.Module
    weight_head: nn.Module
    sample_shape: tuple[int, ...]
    num_classes: int
    guidance_input: bool
    param_dtype: Any = jnp.float32
    remat: str = "none"

    def example_inputs(self, batch: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
        """Abstract inputs (x, t, labels, guidance) of a batch, for tracing without data."""
        f = self.param_dtype
        return {
            "x": jax.ShapeDtypeStruct((batch, *self.sample_shape), f),
            "t": jax.ShapeDtypeStruct((batch,), f),
            "labels": jax.ShapeDtypeStruct((batch,), jnp.int32) if self.num_classes else None,
            "guidance": jax.ShapeDtypeStruct((batch,), f) if self.guidance_input else None,
        }

    def apply_fn(
        self,
        params: Any,
        x_scaled: jax.Array,
        t: jax.Array,
        labels: jax.Array | None = None,
        guidance: jax.Array | None = None,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """F_theta in the shared ``ApplyFn`` convention (``scm_jax.guidance``).

        ``params`` is the network's parameters (``init(...)['net']``); ``key=None`` is evaluation
        mode, a PRNG key turns on dropout and label dropout with that key. With ``remat='full'``
        the call is a ``jax.checkpoint``: its gradient recomputes the forward (same dropout key,
        so the same masks) instead of storing activations; values are unchanged.
        """

        def run(params, x_scaled, t, labels, guidance, key):
            if key is None:
                return self.net.apply({"params": params}, x_scaled, t, labels, guidance)
            return self.net.apply(
                {"params": params}, x_scaled, t, labels, guidance, train=True,
                rngs={"dropout": key},
            )  # fmt: skip

        if self.remat == "full":
            run = jax.checkpoint(run)
        return run(params, x_scaled, t, labels, guidance, key)

    def weight_fn(self, params: Any, t: jax.Array) -> jax.Array:
        """w_phi(t) ``(B,)`` with ``params = init(...)['weight']``."""
        return self.weight_head.apply({"params": params}, t)

    def init(self, key: jax.Array) -> dict[str, Any]:
        """Initialise ``{'net': params, 'weight': params}`` with weights already projected.

        Parameters are created in ``param_dtype``; the weights are unit-RMS per output channel
        (forced weight normalisation holds from step 0). Runs as one jitted computation.
        """
        return _jitted_init(self, key)

    def _module_init(self, key: jax.Array) -> dict[str, Any]:
        """Flax's own initialisation (used for shapes; its per-parameter RNG is slow to compile)."""
        k_net, k_w = jax.random.split(key)
        ex = {k: (None if v is None else jnp.zeros(v.shape, v.dtype))
              for k, v in self.example_inputs(1).items()}  # fmt: skip
        net_vars = self.net.init(k_net, ex["x"], ex["t"], ex["labels"], ex["guidance"])
        w_vars = self.weight_head.init(k_w, ex["t"])
        return {"net": net_vars["params"], "weight": w_vars["params"]}

    def init_per_leaf(self, key: jax.Array) -> dict[str, Any]:
        """Like :meth:`init`, but one N(0, 1) draw per weight (not jitted here).

        Use it under ``jax.jit`` with sharded outputs (``scm_jax.sharding.sharded_init``): each
        draw is partitioned, so every device generates only its own shard. It compiles one random
        kernel per weight, which is slow on XLA:CPU for large networks.
        """
        return self._init(key, per_leaf=True)

    def _init(self, key: jax.Array, per_leaf: bool = False) -> dict[str, Any]:
        """MP weights N(0, 1), gains zero, stored Fourier features their fixed draw, then the
        unit-RMS projection.

        Equivalent in distribution to the modules' initialisers (MPConv: N(0, 1) weights;
        gains: 0). By default all weights come from one draw (one random op instead of one per
        parameter keeps XLA:CPU compilation in seconds); ``per_leaf`` draws each weight
        separately, which shards cleanly.
        """
        shapes = jax.eval_shape(self._module_init, key)
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        n_weights = 0
        for path, leaf in paths_leaves:
            name = getattr(path[-1], "key", None)
            if name == "weight" and len(leaf.shape) >= 2:
                n_weights += leaf.size
            elif len(leaf.shape) != 0 and not (name in FOURIER_PARAMS and len(leaf.shape) == 1):
                raise TypeError(
                    f"parameter {jax.tree_util.keystr(path)} is neither an MP weight, a scalar "
                    "gain nor stored Fourier features; NetworkDef.init only knows those kinds"
                )
        noise = None if per_leaf else jax.random.normal(key, (n_weights,), self.param_dtype)
        out, offset = [], 0
        for i, (path, leaf) in enumerate(paths_leaves):
            name = getattr(path[-1], "key", None)
            if name in FOURIER_PARAMS and len(leaf.shape) == 1:  # 'edm2_fourier': the fixed draw
                value = fourier_constants(leaf.shape[0])[FOURIER_PARAMS.index(name)]
                out.append(jnp.asarray(value, leaf.dtype))
            elif len(leaf.shape) < 2:
                out.append(jnp.zeros(leaf.shape, leaf.dtype))
            elif per_leaf:
                out.append(jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype))
            else:
                out.append(noise[offset : offset + leaf.size].reshape(leaf.shape))
                offset += leaf.size
        return project_weights(jax.tree_util.tree_unflatten(treedef, out))

    def abstract_params(self) -> dict[str, Any]:
        """Parameter shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), nothing materialised."""
        return jax.eval_shape(self._init, jax.random.key(0))


_jitted_init = jax.jit(NetworkDef._init, static_argnums=0)


def _dtype(name: str | None) -> Any:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def build_network(model_cfg: Mapping[str, Any]) -> NetworkDef:
    """Build the network and weighting head described by a config's ``model`` section.

    Args:
      model_cfg: mapping with ``arch`` ('edm2_unet' or 'mlp'), the constructor arguments of that
        network, and optionally ``size``, ``weight_channels`` (width of w_phi's features),
        ``dtype`` (compute) and ``param_dtype`` (storage) as strings, and ``remat`` (one of
        ``REMAT_POLICIES``, default 'none'; 'block' needs 'edm2_unet').
    Returns:
      A :class:`NetworkDef`.
    Raises:
      ValueError: unknown arch, unknown option, or inconsistent hyperparameters (the message names
        the value).
    """
    cfg = dict(model_cfg)
    arch = cfg.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch {arch!r}; expected one of {sorted(ARCHS)}")
    cls = ARCHS[arch]
    remat = check_remat(cfg.get("remat", "none"), arch)
    if "remat_blocks" in cfg:
        raise ValueError("set model.remat ('none', 'block' or 'full'), not model.remat_blocks")
    kwargs = {k: v for k, v in cfg.items() if k not in _NON_NET_KEYS}
    if arch == "edm2_unet" and remat != "none":
        kwargs["remat_blocks"] = True
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"unknown model option(s) {unknown} for arch {arch!r}; known: {sorted(fields)}"
        )
    for key in ("channel_mult", "attn_resolutions"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    param_dtype = _dtype(cfg.get("param_dtype", "float32"))
    kwargs["dtype"] = _dtype(cfg.get("dtype"))
    kwargs["param_dtype"] = param_dtype
    net = cls(**kwargs)
    head = AdaptiveWeight(
        channels=int(cfg.get("weight_channels", 128)),
        time_embedding=net.time_embedding,
        c_noise_mode=net.c_noise_mode,
        c_noise_scale=net.c_noise_scale,
        sigma_d=net.sigma_d,
        param_dtype=param_dtype,
    )
    if arch == "edm2_unet":
        shape = (net.img_resolution, net.img_resolution, net.img_channels)
    else:
        shape = (net.data_dim,)
    return NetworkDef(net, head, shape, net.num_classes, net.guidance_input, param_dtype, remat)


def check_remat(remat: Any, arch: str) -> str:
    """Return ``remat`` if it is a policy ``arch`` supports; else raise one clear ValueError."""
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"unknown model.remat {remat!r}; choose one of {', '.join(REMAT_POLICIES)} "
            "(docs/training.md#memory-levers)"
        )
    if remat == "block" and arch != "edm2_unet":
        raise ValueError(
            f"model.remat='block' rematerialises U-Net blocks and needs model.arch 'edm2_unet', "
            f"not {arch!r}; use model.remat='full' (whole network) or 'none'"
        )
    return remat
