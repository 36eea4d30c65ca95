"""Import EDM2 (Karras et al. 2024, NVlabs/edm2 ``networks_edm2.py``) weights as an sCM teacher.

  scm-jax import-edm2 --from edm2-img512-s.safetensors --out teachers/edm2_s [--sigma-data 0.5]

Input: the state dict of EDM2's ``Precond`` (``unet.enc.64x64_conv.weight``,
``unet.enc.64x64_block0.emb_linear.weight``, ``unet.emb_fourier.freqs``, ``unet.out_gain``,
``logvar_fourier.*``, ...) or of its ``UNet`` (the same names without ``unet.``), as a
``.safetensors`` file or a ``.pt``/``.pth`` file of tensors (read with
``torch.load(weights_only=True)``). EDM2's ``.pkl`` snapshots are pickles that need EDM2's code to
load; turn one into a state dict next to that code (docs/export.md#edm2).

Output: an export folder (``model.safetensors`` + ``config.json``, objective ``diffusion``) that
``--config.teacher.workdir``, ``--config.init_from``, ``scm_jax.load_sampler`` and
``scm_jax.torch.load_network`` accept. The architecture is read from the tensors' names and
shapes (levels, widths, blocks, attention resolutions, classes); the conditioning is stock EDM2:
``time_embedding='edm2_fourier'`` (EDM2's own Fourier frequencies and phases, kept as fixed
parameters), ``c_noise_mode='edm'`` and ``modulation='mul'``.

The conversion (reference §1.4): EDM2's preconditioning has c_in = 1 / sqrt(sigma^2 + sigma_d^2)
= cos t / sigma_d, so its network sees x_t / sigma_d with x_t = cos t x_sigma, exactly our input;
c_noise = ln(sigma) / 4 = ln(sigma_d tan t) / 4 is ``c_noise_mode='edm'``; and D_EDM = cos t x_t
+ sigma_d sin t F_EDM, so F_TrigFlow = -F_EDM: the output gain ``out_gain`` is negated. The
imported model's TrigFlow denoiser then equals EDM2's, D(x_t, t) = D_EDM(x_sigma; sigma). The
uncertainty head (``logvar_*``) is not imported (an export holds the network only).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from scm_jax.run.exports import export_config, save_export
from scm_jax.run.state_dict import from_state_dict, load_safetensors

INSTALL_HINT = "pip install 'scm-jax[torch]'"
PKL_HINT = (
    "EDM2's .pkl snapshots are pickles that only EDM2's own code can load; next to that code run "
    "`python -c \"import pickle, torch; net = pickle.load(open('SNAPSHOT.pkl', 'rb'))['ema']; "
    "torch.save(net.state_dict(), 'edm2.pt')\"` and import edm2.pt (docs/export.md#edm2)"
)
_ENC_CONV = re.compile(r"^enc\.(\d+)x(\d+)_conv\.weight$")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a ``.safetensors`` or ``.pt``/``.pth`` file as float32 numpy arrays.

    Raises:
      FileNotFoundError: no such file; ValueError: a pickle, an unknown suffix, or a file that is
        not a state dict; ImportError: a .pt file without torch installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        raise ValueError(f"{path.name}: {PKL_HINT}")
    if suffix == ".safetensors":
        state = load_safetensors(path)
    elif suffix in (".pt", ".pth"):
        try:
            import torch
        except ImportError:
            raise ImportError(f"reading {path.name} needs PyTorch: {INSTALL_HINT}") from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(
                f"{path.name} is not a plain state dict of tensors ({first[:200]}); {PKL_HINT}"
            ) from None
        for key in ("ema", "net", "state_dict"):  # a dict that wraps the state dict
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
                obj = obj[key]
        if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
            raise ValueError(f"{path.name} holds no state dict of tensors; {PKL_HINT}")
        state = {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}
    else:
        raise ValueError(
            f"{path.name}: expected a .safetensors or .pt/.pth state dict (or see: {PKL_HINT})"
        )
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def infer_model(
    unet: Mapping[str, np.ndarray], *, sigma_d: float, channels_per_head: int
) -> dict[str, Any]:
    """The ``model`` config section of an EDM2 UNet state dict (names without ``unet.``).

    Raises:
      ValueError: not an EDM2 UNet, or an EDM2 variant our network does not have (named).
    """
    from scm_jax.config.defaults import unet_model

    convs = [(m, k) for k in unet if (m := _ENC_CONV.match(k))]
    if len(convs) != 1:
        raise ValueError(
            "not an EDM2 UNet state dict: expected one tensor 'unet.enc.<R>x<R>_conv.weight'"
        )
    ((match, key),) = convs
    resolution = int(match.group(1))
    c0, c_in = unet[key].shape[:2]
    res_levels = sorted(
        {int(m.group(1)) for k in unet if (m := re.match(r"^enc\.(\d+)x\d+_block0\.", k))},
        reverse=True,
    )
    widths = [int(unet[f"enc.{r}x{r}_block0.conv_res1.weight"].shape[0]) for r in res_levels]
    if not widths or res_levels != [resolution >> i for i in range(len(widths))]:
        raise ValueError(f"EDM2 state dict with unexpected levels {res_levels}")
    model_channels = math.gcd(*widths)
    num_blocks = len(
        [
            k
            for k in unet
            if re.match(
                rf"^enc\.{resolution}x{resolution}_block\d+\."
                r"conv_res1\.weight$",
                k,
            )
        ]
    )
    attn = tuple(r for r in res_levels if f"enc.{r}x{r}_block0.attn_qkv.weight" in unet)
    num_classes = int(unet["emb_label.weight"].shape[1]) if "emb_label.weight" in unet else 0
    emb = unet.get("emb_noise.weight")
    if emb is None or tuple(emb.shape) != (max(widths), widths[0]):
        raise ValueError(
            f"EDM2 noise embedding {None if emb is None else tuple(emb.shape)} is not "
            f"(max width {max(widths)}, first width {widths[0]}): channel_mult_noise / "
            "channel_mult_emb other than the defaults are not supported"
        )
    if "emb_fourier.freqs" not in unet:
        raise ValueError("EDM2 state dict without emb_fourier.freqs/phases (the Fourier buffers)")
    model = unet_model(
        resolution=resolution,
        channels=int(c_in) - 1,
        num_classes=num_classes,
        model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths),
        num_blocks=num_blocks,
        attn_resolutions=attn,
        channels_per_head=channels_per_head,
        size="edm2-import",
    )
    assert widths[0] == c0
    model.update(
        time_embedding="edm2_fourier", c_noise_mode="edm", modulation="mul", sigma_d=float(sigma_d)
    )
    return model


def edm2_names(unet: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """EDM2 UNet tensors renamed to ours (PyTorch layouts are the same), ``out_gain`` negated
    (F_TrigFlow = -F_EDM)."""
    out: dict[str, np.ndarray] = {}
    for name, a in unet.items():
        parts = name.split(".")
        if parts[0] in ("enc", "dec"):
            parts = [f"{parts[0]}_{parts[1]}", *parts[2:]]
            if parts[1] in ("emb_gain", "emb_linear"):
                parts = [parts[0], "modulation", *parts[1:]]
        elif parts[0] in ("emb_fourier", "emb_noise", "emb_label"):
            parts = ["cond", *parts]
        if name == "out_gain":
            a = -a
        out[".".join(parts)] = a
    return out


def import_edm2(
    src: str | Path,
    out: str | Path,
    *,
    sigma_d: float = 0.5,
    channels_per_head: int = 64,
    sigma_max: float = 80.0,
) -> dict[str, Any]:
    """Convert an EDM2 state dict file into an export folder usable as an sCD teacher.

    Args:
      src: ``.safetensors`` or ``.pt``/``.pth`` state dict of EDM2's Precond or UNet.
      out: the export folder to write.
      sigma_d: EDM2's ``sigma_data`` (0.5 in all its configs).
      channels_per_head: EDM2's attention head width (64 in all its configs; not in the weights).
      sigma_max: the TrigFlow config's largest noise level (EDM2 samples from 80).
    Returns:
      The export's config dict.
    Raises:
      FileNotFoundError / ValueError / ImportError: as :func:`read_state_dict` and
        :func:`infer_model`, or weights that do not fit (named).
    """
    from scm_jax.networks import build_network

    state = read_state_dict(src)
    unet = {k.removeprefix("unet."): v for k, v in state.items() if not k.startswith("logvar_")}
    model = infer_model(unet, sigma_d=sigma_d, channels_per_head=channels_per_head)
    abstract = build_network(model).abstract_params()["net"]
    params = from_state_dict(edm2_names(unet), abstract, where=f"EDM2 weights {Path(src).name}")
    run_cfg = {
        "model": model,
        "objective": "diffusion",
        "trigflow": {"sigma_d": float(sigma_d), "sigma_max": float(sigma_max), "t_mid": 1.1},
    }
    cfg = export_config(
        run_cfg, ema="edm2", step=None, source=f"EDM2 state dict {Path(src).resolve()}"
    )
    save_export(out, params, cfg)
    return cfg
