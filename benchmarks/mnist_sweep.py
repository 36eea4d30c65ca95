"""One point of a sweep over the embedded default's settings: train, then score the samples.

  python benchmarks/mnist_sweep.py NAME [--config=configs/mnist.py[:args]] [--config.x=y ...]

Trains ``configs/mnist.py`` (or ``--config``) with the overrides into ``/tmp/mnist_sweep/NAME``,
scores 1,000 class-conditional samples (1- and 2-step; Heun with 18 steps for a diffusion run)
with the 1-nearest-neighbour label agreement of ``mnist_default.py``, saves a 100-sample grid per
setting beside the run, and appends one JSON line to ``benchmarks/results/mnist_sweep.jsonl``.
Scores depend only on the steps taken, not on the machine's load, so points can run side by side;
their times cannot be compared then.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from mnist_default import nn_agreement

from scm_jax import cli
from scm_jax.data.sources import load_mnist_5k
from scm_jax.image_grids import save_grid
from scm_jax.run.sampler import load_sampler
from scm_jax.train.loop import train

RESULTS = Path(__file__).resolve().parent / "results" / "mnist_sweep.jsonl"
ROOT = Path("/tmp/mnist_sweep")


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    name, config_args = argv[0], argv[1:]
    if not any(a.startswith("--config=") for a in config_args):
        config_args = ["--config=configs/mnist.py", *config_args]
    config = cli.config_from_args(config_args)
    workdir = ROOT / name
    if workdir.exists():
        shutil.rmtree(workdir)
    t0 = time.time()
    train(config, workdir)
    seconds = time.time() - t0
    ref_u8, ref_y = load_mnist_5k()
    ref_x = ref_u8.astype(np.float32) / 127.5 - 1
    sampler = load_sampler(workdir)
    labels = np.arange(1000, dtype=np.int32) % 10
    row = {"name": name, "args": config_args, "train_wall_seconds": round(seconds, 1)}
    for steps in (18,) if config.objective == "diffusion" else (1, 2):
        x = sampler.sample(123, 1000, steps=steps, labels=labels)
        row[f"{steps}step_nn_label_agreement"] = round(nn_agreement(x, labels, ref_x, ref_y), 3)
        save_grid(workdir / f"grid_{steps}step.png", x[:100], ncols=10)
    print(json.dumps(row), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
