"""Sanity anchor for the FID pipeline: CIFAR-10 (JPEG) train against test, 10k images each.

  python benchmarks/fid_cifar10_anchor.py [--inception DIR_OR_NPZ] [--num 10000] [--batch 64]
                                          [--reuse]

Runs ``scm-jax fid-stats`` twice, exactly as a user would: the first ``--num`` training images
(class-balanced, the loader's interleaved order) and the first ``--num`` test images of
``../shared/data/cifar10_jpeg``, the second with ``--ref`` so the command prints the FID. It then
recomputes the FID from the two saved statistics with SciPy's ``sqrtm`` in float64 (the
pytorch-fid formula) as an independent check. Without ``--inception`` the Inception weights are
converted once from ``../shared/data/inception/inception_v3_fid_torchscript.pt`` into
``.data/fid/`` (ignored by git; needs torch). Writes ``benchmarks/results/fid_cifar10_anchor.json``
and keeps the statistics in ``.data/fid/``; ``--reuse`` takes a statistics file already there
(written by the same ``scm-jax fid-stats`` command: same images, count, weights and pipeline,
checked from its metadata) instead of recomputing it, and records that it did.

The images are a JPEG (quality 75) re-encoding of CIFAR-10, so the number is not comparable with
published CIFAR-10 FIDs; it anchors our own pipeline (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from scm_jax import cli
from scm_jax.eval import fid

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "fid_cifar10_anchor.json"
WORK = REPO / ".data" / "fid"


def scipy_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """pytorch-fid's formula: ||mu1 - mu2||^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)), float64."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def ensure_weights(path: str | None) -> Path:
    """``--inception`` as given, else weights converted once into ``.data/fid/``."""
    if path:
        return Path(path)
    out = WORK / "inception_fid.npz"
    if not out.is_file():
        src = SHARED / "inception" / "inception_v3_fid_torchscript.pt"
        if not src.is_file():
            sys.exit(f"no --inception given and {src} is absent: pass converted weights")
        code = cli.main(["fid-weights", "--from", str(src), "--out", str(WORK)])
        if code:
            sys.exit(code)
    return out


def reusable(path: Path, data: Path, num: int, weights_sha: str) -> bool:
    """Whether ``path`` holds statistics of the first ``num`` images of ``data`` made with
    these weights and the default pipeline (tf1-bilinear resize, 'tf' input convention)."""
    if not path.is_file():
        return False
    _, _, n, meta = fid.load_stats(path)
    return (
        n == num
        and meta.get("weights_sha256") == weights_sha
        and meta.get("resize") == "tf1-bilinear"
        and meta.get("input_convention") == "tf"
        and str(meta.get("source", "")).startswith(str(data))
        and str(meta.get("source", "")).endswith(f"first {num} images")
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inception", help="converted weights (default: convert into .data/fid)")
    parser.add_argument("--num", type=int, default=10_000, help="images per side (10000)")
    parser.add_argument("--batch", type=int, help="images per call (default: the command's)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--reuse", action="store_true", help="reuse matching statistics")
    args = parser.parse_args(argv)
    data = SHARED / "cifar10_jpeg"
    if not (data / "train.tar.gz").is_file() or not (data / "test.tar.gz").is_file():
        sys.exit(f"{data}/{{train,test}}.tar.gz not found (../shared/data is needed)")
    weights = ensure_weights(args.inception)
    WORK.mkdir(parents=True, exist_ok=True)
    stats, seconds, commands, reused = {}, {}, [], []
    weights_sha = ""
    if args.reuse:
        from scm_jax.eval.features import load_extractor

        weights_sha = load_extractor(weights).info.get("source_sha256", "")
    for split in ("train", "test"):
        out = WORK / f"cifar10_jpeg_{split}_{args.num}.npz"
        archive = data / f"{split}.tar.gz"
        cmd = ["fid-stats", "--data", str(data / f"{split}.tar.gz"), "--out", str(out),
               "--num", str(args.num), "--inception", str(weights)]  # fmt: skip
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        if split == "test":
            cmd += ["--ref", str(stats["train"])]
        print("scm-jax " + " ".join(cmd), flush=True)
        if args.reuse and reusable(out, archive, args.num, weights_sha):
            print(f"  reusing {out} (same images, count, weights and pipeline)")
            stats[split], commands = out, [*commands, "scm-jax " + " ".join(cmd)]
            reused.append(split)
            continue
        t0 = time.perf_counter()
        if code := cli.main(cmd):
            sys.exit(code)
        seconds[split] = time.perf_counter() - t0
        stats[split], commands = out, [*commands, "scm-jax " + " ".join(cmd)]
    a, b = fid.load_stats(stats["train"]), fid.load_stats(stats["test"])
    ours, notes = fid.fid_from_stats(a, b, warn=False)
    ref = scipy_fid(a[0], a[1], b[0], b[1])
    result = {
        "what": f"FID, CIFAR-10 JPEG train (first {args.num}) vs test (first {args.num})",
        "fid": ours,
        "fid_scipy_sqrtm": ref,
        "relative_difference": abs(ours - ref) / ref,
        "notes": notes,
        "inception": {k: v for k, v in a[3].items() if k != "path"},
        "seconds": seconds,
        "images_per_s": {k: args.num / v for k, v in seconds.items()},
        "reused_statistics": reused,
        "commands": commands,
        "command": "python benchmarks/fid_cifar10_anchor.py " + " ".join(argv),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"FID {ours:.4f} (SciPy sqrtm {ref:.4f}); wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
