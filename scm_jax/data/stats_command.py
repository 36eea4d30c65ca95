"""``scm-jax data-stats``: measure a config's data scale (per-channel mean and std).

::

    scm-jax data-stats --config mnist
    scm-jax data-stats --config cifar10 --config.dataset.path=.../train.tar.gz --num 10000

It reads the dataset a config describes in data units (images in [-1, 1], before
``dataset.normalize``), prints the per-channel mean and standard deviation, what the model
would see with and without ``dataset.normalize='per_channel'``, the config's stated values
beside the measured ones, and the overrides that state them (``scm_jax.data.scale``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from scm_jax.data.scale import channel_stats, data_scale


def measure(config: ml_collections.ConfigDict, *, num: int = 0) -> dict[str, Any]:
    """The statistics of ``config.dataset`` in data units and what the model sees.

    Args:
      config: a resolved config.
      num: how many leading examples to read (0 = all).
    Returns:
      :func:`scm_jax.data.scale.channel_stats`'s dict plus ``sigma_d``, ``stated`` (the
      config's ``mean`` / ``std`` / ``normalize``) and ``model_std`` (the std the network is
      trained on with the config as it is) and ``model_rms`` (its RMS about zero).
    """
    from scm_jax.data.sources import load_dataset

    sigma_d = float(config.trigflow.sigma_d)
    t0 = time.perf_counter()
    source = load_dataset(config.dataset, sigma_d=sigma_d, seed=config.seed, data_units=True)

    shown = [0]

    def log(done: int, total: int) -> None:  # at most ten lines, on large datasets only
        if total > 20_000 and (done * 10 // total > shown[0] or done == total):
            shown[0] = done * 10 // total
            print(f"  {done}/{total} examples", file=sys.stderr, flush=True)

    stats = channel_stats(source, num=num, log=log)
    ds = config.dataset
    scale = data_scale(ds, sigma_d) if config.dataset.source != "latents" else None
    if scale is None or scale.identity:
        model_std, model_rms = stats["std_all"], stats["rms_all"]
    else:  # per channel c: mean (m_c - stated mean_c) g_c, std s_c g_c, g_c = sigma_d / std_c
        g = [sigma_d / sd for sd in scale.std]
        means = [(m - sm) * gc for m, sm, gc in zip(stats["mean"], scale.mean, g, strict=True)]
        stds = [sc * gc for sc, gc in zip(stats["std"], g, strict=True)]
        mean_all = sum(means) / len(means)
        ms = sum(m * m + v * v for m, v in zip(means, stds, strict=True)) / len(means)
        model_std, model_rms = max(ms - mean_all**2, 0.0) ** 0.5, ms**0.5
    stats.update(
        sigma_d=sigma_d,
        stated={"mean": list(ds.mean), "std": list(ds.std), "normalize": ds.normalize},
        model_std=float(model_std),
        model_rms=float(model_rms),
        seconds=time.perf_counter() - t0,
    )
    return stats


def format_stats(name: str, s: dict[str, Any]) -> str:
    """The human-readable report of :func:`measure`'s result."""

    def vec(v: Sequence[float]) -> str:
        return "(" + ", ".join(f"{x:.4f}" for x in v) + ")"

    lines = [
        f"{name}: {s['num']} examples in data units, {s['seconds']:.1f} s",
        f"  per channel  mean {vec(s['mean'])}  std {vec(s['std'])}",
        f"  all values   mean {s['mean_all']:.4f}  std {s['std_all']:.4f}  rms "
        f"{s['rms_all']:.4f}  range [{s['min']:.3f}, {s['max']:.3f}]",
        f"  stated       mean {vec(s['stated']['mean']) if s['stated']['mean'] else 'none'}  "
        f"std {vec(s['stated']['std']) if s['stated']['std'] else 'none'}  normalize "
        f"{s['stated']['normalize']}",
        f"  the network sees std {s['model_std']:.4f}, RMS {s['model_rms']:.4f} (sigma_d = "
        f"{s['sigma_d']:g}: {s['model_std'] / s['sigma_d'] - 1:+.0%}, "
        f"{s['model_rms'] / s['sigma_d'] - 1:+.0%})",
        "  to state and use these: --config.dataset.mean='"
        + repr(tuple(round(m, 4) for m in s["mean"]))
        + "' --config.dataset.std='"
        + repr(tuple(round(m, 4) for m in s["std"]))
        + "' --config.dataset.normalize=per_channel",
    ]
    return "\n".join(lines)


def data_stats_main(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax data-stats``: per-channel mean and std of a config's data (data units)."""
    parser = argparse.ArgumentParser(prog="scm-jax data-stats", description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=0, help="read the first N examples (0: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a report")
    args = parser.parse_args(argv)
    if args.num < 0:
        raise ValueError(f"--num must be >= 0, got {args.num}")
    stats = measure(config, num=args.num)
    name = config.dataset.name or config.dataset.source
    print(json.dumps(stats, indent=2) if args.json else format_stats(name, stats))
    return 0
