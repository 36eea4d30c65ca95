"""PyTorch twins of the sCM networks: the EDM2 U-Net and the toy MP-MLP (``scm_jax.networks``).

``forward(x_scaled, t, labels=None, guidance=None)`` computes F_theta exactly as the JAX modules
do, for every option they have (both archs, ``'adn'``/``'mul'``/``'adagn'`` modulation,
positional / Fourier / stored-Fourier time embeddings, c_noise ``'t'``/``'edm'``, guidance input,
labels, attention resolutions, channel multipliers, dropout and label dropout in ``train()``
mode). Images are NCHW.
Module and parameter names follow the Flax tree (``enc_8x8_block0.conv_res0.weight`` is
``params['enc_8x8_block0']['conv_res0']['weight']``), so a ``state_dict`` is an export's
safetensors file as it is (``scm_jax.run.state_dict``).
"""

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from scm_jax.networks.embeddings import C_NOISE_MODES, TIME_EMBEDDINGS
from scm_jax.torch.layers import MODULATIONS
from scm_jax.torch.mlp import MLP
from scm_jax.torch.unet import UNet

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

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
            raise ValueError(
                f"model.{name}={value!r} is not implemented in the PyTorch port (it has {choices})"
            )
    cls = ARCHS[arch]
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in cfg.items() if k not in _IGNORED_KEYS}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"model option(s) {unknown} of arch {arch!r} are not implemented in the "
            "PyTorch port; export refused rather than run a different network"
        )
    dtype = kwargs.pop("dtype", None)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"unknown model.dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    kwargs["dtype"] = None if dtype in (None, "float32") else _DTYPES[dtype]
    for key in ("channel_mult", "attn_resolutions"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return cls(**kwargs)
