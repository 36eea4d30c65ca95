"""scm-jax networks in PyTorch: load an export, run F_theta and the 1- and 2-step samplers.

::

    import torch, scm_jax.torch as scm_torch
    net = scm_torch.load_network("exports/mnist")       # torch.nn.Module, eval mode, float32
    F = net(x_t / net.sigma_d, t, labels)               # F_theta, NCHW, as the JAX network
    x0 = net.sample(torch.randn(2, 16, 1, 28, 28), labels=torch.arange(16) % 10)  # 2 steps

An optional extra (``pip install 'scm-jax[torch]'``); torch is imported only here and in the
ONNX export. The export folder is ``scm-jax export --to torch`` (``model.safetensors`` +
``config.json``, docs/export.md). All absolute imports, so this package never shadows ``torch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'scm-jax[torch]'"

try:
    import torch
except ImportError as e:  # pragma: no cover - exercised where torch is absent
    raise ImportError(f"scm_jax.torch needs PyTorch: {INSTALL_HINT} ({e})") from None

from scm_jax.torch.networks import MLP, UNet, build_network  # noqa: E402
from scm_jax.torch.sampling import (  # noqa: E402
    ConsistencySampler,
    SCMNetwork,
    consistency_times,
    sample_consistency,
)

__all__ = [
    "MLP",
    "ConsistencySampler",
    "SCMNetwork",
    "UNet",
    "build_network",
    "consistency_times",
    "load_network",
    "sample_consistency",
]


def load_network(
    export_dir: str | Path, *, device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The PyTorch F_theta of an export folder, weights loaded, in eval mode.

    The module (a :class:`~scm_jax.torch.sampling.SCMNetwork`: :class:`UNet` or :class:`MLP`) gets
    the export's TrigFlow constants ``sigma_d``, ``t_max``, ``t_mid``, ``guidance`` (the default
    guidance input) and ``config`` (the export's config dict), which its ``sample`` and
    ``consistency`` methods use.

    Args:
      export_dir: a folder written by ``scm-jax export`` (or ``import-edm2``).
      device: where to put the module (default CPU).
      dtype: parameter dtype (float32 reproduces the JAX network within float rounding).
    Raises:
      FileNotFoundError / ValueError: not an export, damaged weights, weights that do not fit, or
        a model option the PyTorch port does not implement.
    """
    from safetensors.torch import load_file

    from scm_jax.run.exports import WEIGHTS_FILE, read_export_config

    cfg = read_export_config(export_dir)
    net = build_network(cfg["model"])
    path = Path(export_dir) / cfg.get("weights", WEIGHTS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {str(path)!r} in the export")
    try:
        state = load_file(str(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file ({first[:200]})"
        ) from None
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the config's network: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the network needs "
                f"{tuple(own[name].shape)}"
            )
    net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    net = net.to(device=device, dtype=dtype).eval()
    net.config = cfg
    net.sigma_d, net.t_max, net.t_mid = (
        float(cfg["sigma_d"]),
        float(cfg["t_max"]),
        float(cfg["t_mid"]),
    )
    net.guidance = cfg.get("guidance")
    net.data_scale = cfg.get("data_scale")  # absent in exports written before it existed
    return net
