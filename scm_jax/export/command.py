"""``scm-jax export`` and ``scm-jax import-edm2``.

  scm-jax export --workdir runs/mnist --to safetensors|torch|onnx|stablehlo --out exports/mnist
                 [--ema NAME] [--step N]
  scm-jax import-edm2 --from edm2-img512-s.safetensors --out teachers/edm2_s [--sigma-data 0.5]

Every ``--to`` writes the export folder (``model.safetensors`` + ``config.json``: the EMA weights
in PyTorch names and layouts, docs/export.md); ``torch`` also loads it into ``scm_jax.torch``
and checks F_theta against JAX, ``onnx`` does too and adds ``network.onnx`` and the 1- and
2-step samplers checked with ONNX Runtime, ``stablehlo`` adds serialized ``jax.export``
functions checked bit-exact after a round trip.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scm_jax import objectives
from scm_jax.files import check_output_folder, write_bytes_atomic

FORMATS = ("safetensors", "torch", "onnx", "stablehlo")
TORCH_HINT = "pip install 'scm-jax[torch]'"
EXPORT_HINT = "pip install 'scm-jax[torch,export]'"


def _check_deps(fmt: str) -> None:
    """Fail before any slow work when the format's packages are missing."""
    need = {
        "torch": [("torch", TORCH_HINT)],
        "onnx": [
            ("torch", EXPORT_HINT),
            ("onnx", EXPORT_HINT),
            ("onnxscript", EXPORT_HINT),
            ("onnxruntime", EXPORT_HINT),
        ],
        "stablehlo": [("flatbuffers", "pip install 'scm-jax[export]'")],
    }.get(fmt, [])
    import importlib.util

    for module, hint in need:
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"--to {fmt} needs {module}, which is not installed: {hint}")


def check_out_dir(out: Path) -> None:
    """``out`` must be a new or empty folder, or an earlier export (replaced), and writable.
    Nothing is created here (the export writes only once its source has loaded).

    Raises:
      ValueError: a file, a folder with other content (nothing is overwritten), or not writable.
    """
    from scm_jax.run.exports import is_export

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise ValueError(
            f"--out {str(out)!r} is a folder with other files; use a new folder "
            "(an earlier export there would be replaced)"
        )
    check_output_folder(out)  # not a file, under a writable folder


def load_source(path: str | Path, *, ema: str | None, step: int | None) -> tuple[Any, dict]:
    """EMA network parameters (numpy tree) and export config of a run or an export folder."""
    from scm_jax.run.exports import export_config, is_export, load_export

    if is_export(path):
        from scm_jax.run.emas import check_export_ema

        params, cfg = load_export(path)
        check_export_ema(cfg, path, ema=ema, step=step)
        return params, cfg
    import jax

    from scm_jax.run.emas import load_ema_checkpoint

    # the step actually read: after a fallback past a damaged newest checkpoint, the older one
    params, run_cfg, name, step = load_ema_checkpoint(path, None, None, ema=ema, step=step,
                                                  what="run")  # fmt: skip
    params = jax.tree.map(np.asarray, params)
    cfg = export_config(run_cfg, ema=name, step=step, source=str(Path(path).resolve()))
    return params, cfg


def torch_parity(out: Path, params: Any, cfg: dict, batch: int = 2) -> float:
    """max |F_torch - F_jax| on a random batch (the PyTorch module loaded from ``out``)."""
    import torch

    from scm_jax.networks import build_network
    from scm_jax.torch import load_network

    nd = build_network(cfg["model"])
    net = load_network(out)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *nd.sample_shape)).astype(np.float32)
    t = (0.1 + 1.4 * rng.random(batch)).astype(np.float32)
    y = rng.integers(0, nd.num_classes, batch).astype(np.int32) if nd.num_classes else None
    g = np.full((batch,), cfg.get("guidance") or 1.0, np.float32) if nd.guidance_input else None
    F_jax = np.asarray(nd.apply_fn(params, x, t, y, g))
    perm = (0, 3, 1, 2) if x.ndim == 4 else (0, 1)
    with torch.no_grad():
        F_t = net(
            torch.from_numpy(x.transpose(perm)),
            torch.from_numpy(t),
            None if y is None else torch.from_numpy(y.astype(np.int64)),
            None if g is None else torch.from_numpy(g),
        ).numpy()
    inv = (0, 2, 3, 1) if x.ndim == 4 else (0, 1)
    return float(np.abs(F_t.transpose(inv) - F_jax).max())


def write_stablehlo(out: Path, params: Any, cfg: dict) -> list[str]:
    """Serialized network and 1-/2-step samplers in ``out``, each checked after a round trip."""
    import jax.numpy as jnp

    from scm_jax.data.scale import data_scale
    from scm_jax.export import stablehlo
    from scm_jax.networks import build_network
    from scm_jax.run.state_dict import to_state_dict

    nd = build_network(cfg["model"])
    state = to_state_dict(params)
    jobs = [("network.stablehlo", stablehlo.export_network(nd, state))]
    if not objectives.is_diffusion(cfg["objective"]):
        for n in (1, 2):
            exp = stablehlo.export_sampler(
                nd,
                state,
                n,
                sigma_d=cfg["sigma_d"],
                t_max=cfg["t_max"],
                t_mid=cfg["t_mid"],
                scale=data_scale(cfg.get("dataset") or {}, cfg["sigma_d"]),
            )
            jobs.append((f"sample_{n}step.stablehlo", exp))
    rng = np.random.default_rng(0)
    for fname, exp in jobs:
        data = stablehlo.serialize(exp)
        write_bytes_atomic(out / fname, data)
        back = stablehlo.deserialize((out / fname).read_bytes())
        args = [
            np.asarray(
                rng.standard_normal(tuple(2 if not isinstance(d, int) else d for d in a.shape)),
                a.dtype,
            )
            for a in exp.in_avals[len(state) :]
        ]
        args = [
            jnp.asarray(a) if a.dtype != np.int32 else jnp.zeros(a.shape, jnp.int32) for a in args
        ]
        a, b = np.asarray(back.call(state, *args)), np.asarray(exp.call(state, *args))
        if a.tobytes() != b.tobytes():
            raise ValueError(f"{fname}: the deserialized function differs from the exported one")
    return [f for f, _ in jobs]


def export_main(argv: Sequence[str]) -> int:
    """``scm-jax export``: a run's EMA weights as safetensors, PyTorch, ONNX or StableHLO."""
    parser = argparse.ArgumentParser(prog="scm-jax export", description=export_main.__doc__)
    parser.add_argument("--workdir", required=True, help="a training run (or an export folder)")
    parser.add_argument("--to", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--out", required=True, help="the export folder to write")
    parser.add_argument("--ema", help="which EMA (default: the run's first)")
    parser.add_argument("--step", type=int, help="which checkpoint (default: the latest)")
    args = parser.parse_args(argv)
    if args.to not in FORMATS:
        raise ValueError(f"--to {args.to!r}: unknown format; choose one of {', '.join(FORMATS)}")
    _check_deps(args.to)
    out = Path(args.out)
    if not Path(args.workdir).is_dir():
        raise FileNotFoundError(f"--workdir {args.workdir!r} is not a folder")
    check_out_dir(out)
    params, cfg = load_source(args.workdir, ema=args.ema, step=args.step)
    from scm_jax.run.exports import WEIGHTS_FILE, save_export

    save_export(out, params, cfg)
    print(f"wrote {out / WEIGHTS_FILE} and config.json (EMA {cfg['ema']}, step {cfg['step']})")
    if args.to in ("torch", "onnx"):
        err = torch_parity(out, params, cfg)
        print(f"scm_jax.torch.load_network({str(out)!r}): max |F_torch - F_jax| = {err:.2e}")
    if args.to == "onnx":
        from scm_jax.export.onnx_export import export_onnx

        for fname, err in export_onnx(out, out).items():
            print(f"wrote {out / fname} (ONNX Runtime vs PyTorch: max error {err:.2e})")
    elif args.to == "stablehlo":
        for fname in write_stablehlo(out, params, cfg):
            print(f"wrote {out / fname} (platforms cpu, cuda, tpu; symbolic batch)")
    return 0


def import_edm2_main(argv: Sequence[str]) -> int:
    """``scm-jax import-edm2``: EDM2 weights (a state dict) as an sCD teacher export folder."""
    parser = argparse.ArgumentParser(
        prog="scm-jax import-edm2", description=import_edm2_main.__doc__
    )
    parser.add_argument(
        "--from",
        dest="src",
        required=True,
        help="EDM2 Precond/UNet state dict: FILE.safetensors or FILE.pt",
    )
    parser.add_argument("--out", required=True, help="the export folder to write")
    parser.add_argument("--sigma-data", type=float, default=0.5, help="EDM2's sigma_data")
    parser.add_argument("--channels-per-head", type=int, default=64, help="EDM2's head width")
    args = parser.parse_args(argv)
    from scm_jax.export.edm2 import import_edm2

    out = Path(args.out)
    check_out_dir(out)
    cfg = import_edm2(
        args.src, out, sigma_d=args.sigma_data, channels_per_head=args.channels_per_head
    )
    m = cfg["model"]
    print(
        f"wrote {out} (EDM2 U-Net {m['img_resolution']}x{m['img_resolution']}x"
        f"{m['img_channels']}, model_channels {m['model_channels']}, channel_mult "
        f"{tuple(m['channel_mult'])}, {m['num_classes']} classes); use it as "
        f"--config.teacher.workdir={out} with --config.model.time_embedding=edm2_fourier "
        "--config.model.c_noise_mode=edm --config.model.modulation=mul"
    )
    return 0
