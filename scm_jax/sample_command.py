"""``scm-jax sample``: samples of a run's (or an export's) EMA weights as a PNG grid or an .npz.

Every input a user can get wrong (the output path, the numbers, the labels, the run, an EMA name,
more samples than the host's memory holds) is a ``ValueError`` with one line, raised before any
sampling; ``scm_jax.cli`` prints it as a usage error (exit 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from scm_jax.files import check_output_file


def parse_labels(text: str | None) -> list[int] | None:
    """``'3'`` -> [3]; ``'0,1,2'`` -> [0, 1, 2]; ``'0-9'`` -> [0..9]; None -> None.

    Raises:
      ValueError: not ints, ranges or a comma-separated list of them.
    """
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in filter(None, text.split(",")):
            lo, sep, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep and lo else [int(part)]
    except ValueError:
        raise ValueError(f"--labels {text!r}: expected ints like 3, 0,1,2 or 0-9") from None
    return out


def sample_main(argv: Sequence[str]) -> int:
    """``scm-jax sample ARGV``; returns the exit status (0)."""
    parser = argparse.ArgumentParser(
        prog="scm-jax sample",
        description="draw samples from a run's EMA weights into a PNG grid or an .npz",
    )
    parser.add_argument("--workdir", required=True, help="a training run's folder")
    parser.add_argument(
        "--steps", type=int, default=2,
        help="network evaluations (consistency) or Heun steps (diffusion)",
    )  # fmt: skip
    parser.add_argument("--num", type=int, default=64, help="number of samples")
    parser.add_argument("--labels", help="class labels: 3 | 0,1,2 | 0-9 (repeated to --num)")
    parser.add_argument("--guidance", type=float, help="CFG scale (guided students, teachers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", help="which EMA (default: the run's first)")
    parser.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npz (arrays)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out {args.out!r}: use a .png (grid) or .npz file")
    check_output_file(args.out, "--out")  # a folder, read-only, no parent
    if args.num < 1 or args.steps < 1:
        raise ValueError(f"--num ({args.num}) and --steps ({args.steps}) must be >= 1")
    labels = parse_labels(args.labels)
    if labels is not None and not labels:
        raise ValueError(f"--labels {args.labels!r}: no labels given")
    if labels is not None:
        labels = (labels * (args.num // len(labels) + 1))[: args.num]
    import numpy as np

    from scm_jax import image_grids
    from scm_jax.run.sampler import load_sampler

    sampler = load_sampler(args.workdir, ema=args.ema)
    if out.suffix == ".png" and len(sampler.shape) != 3:
        raise ValueError("this model makes points, not images: use --out FILE.npz")
    x = sampler.sample(args.seed, args.num, steps=args.steps, labels=labels,
                       guidance=args.guidance)  # fmt: skip
    if out.suffix == ".png":
        image_grids.save_grid(out, x)
    else:
        y = None if labels is None else np.asarray(labels, np.int32)
        image_grids.save_samples_npz(out, x, y)
    print(f"wrote {args.num} samples ({args.steps} steps) to {out}")
    return 0
