"""The embedded default (``make run``): train sCD on MNIST-5k, time it, and score the samples.

  python benchmarks/mnist_default.py --fresh [--workdir DIR] [--teacher-num N] [--config.x=y ...]

Runs exactly ``scm-jax train --config configs/mnist.py`` (plus any overrides), then measures:
the wall time of the run, the loss over training (first and last logged intervals), and how
digit-like the class-conditional samples are: a 1-nearest-neighbour classifier on the 5,000
training digits labels 1,000 1-step and 2-step samples, and we report how often it agrees with
the class the sample was drawn for (chance: 10%; the same classifier on the MNIST test set, where
../shared/data has it, gives its accuracy on real digits for comparison; the run's teacher, where
it has one, sampled with Heun's 18 steps, gives the score the student distils from). Writes
``benchmarks/results/mnist_default.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from scm_jax import cli
from scm_jax.data.sources import load_mnist_5k
from scm_jax.eval.nearest_neighbor import nn_label_agreement as nn_agreement
from scm_jax.run.sampler import load_sampler
from scm_jax.train.loop import train
from scm_jax.train.writers import read_metrics

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "mnist_default.json"
MNIST_TEST = REPO.parent / "shared" / "data" / "mnist"


def mnist_test_set(n: int = 1000) -> tuple[np.ndarray, np.ndarray] | None:
    """The first ``n`` official MNIST test digits in [-1, 1], if ../shared/data has them."""
    img, lab = MNIST_TEST / "t10k-images-idx3-ubyte.gz", MNIST_TEST / "t10k-labels-idx1-ubyte.gz"
    if not (img.is_file() and lab.is_file()):
        return None
    x = np.frombuffer(gzip.open(img).read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:n]
    y = np.frombuffer(gzip.open(lab).read(), np.uint8, offset=8)[:n].astype(np.int32)
    return x.astype(np.float32) / 127.5 - 1, y


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="/tmp/scm_jax_mnist_default")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    parser.add_argument("--teacher-num", type=int, default=500, help="samples of the teacher's "
                        "(Heun, 18 steps; 0: skip)")  # fmt: skip
    config_args, rest = cli.split_config_args(argv)
    args = parser.parse_args(rest)
    config = cli.config_from_args(["--config=configs/mnist.py", *config_args])
    workdir = Path(args.workdir)
    if args.fresh and workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    load_before = os.getloadavg()[0]
    t0 = time.time()
    out = train(config, workdir)
    seconds = time.time() - t0

    rows = read_metrics(workdir)
    ref_u8, ref_y = load_mnist_5k()
    ref_x = ref_u8.astype(np.float32) / 127.5 - 1
    sampler = load_sampler(workdir)
    labels = np.arange(1000, dtype=np.int32) % 10
    scores = {}
    for steps in (1, 2):
        x = sampler.sample(123, 1000, steps=steps, labels=labels)
        scores[f"{steps}step_nn_label_agreement"] = nn_agreement(x, labels, ref_x, ref_y)
    if args.teacher_num and config.teacher.workdir:
        teacher = load_sampler(config.teacher.workdir)
        t_labels = np.arange(args.teacher_num, dtype=np.int32) % 10
        x = teacher.sample(123, args.teacher_num, steps=18, labels=t_labels)
        scores["teacher_heun18_nn_label_agreement"] = nn_agreement(x, t_labels, ref_x, ref_y)
        scores["teacher_num"] = args.teacher_num
    test = mnist_test_set()
    if test is not None:
        scores["real_test_digits_nn_accuracy"] = nn_agreement(test[0], test[1], ref_x, ref_y)
    result = {
        "command": "python benchmarks/mnist_default.py --fresh " + " ".join(config_args),
        "teacher": str(config.teacher.workdir).replace(str(REPO) + "/", "") or None,
        "equivalent": "make run (scm-jax train --config configs/mnist.py)",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        # Other work on the machine inflates the time: the 1-minute load average before and after.
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "steps": out["step"],
        "batch_size": config.batch_size,
        "train_wall_seconds": round(seconds, 1),
        "compile_seconds": rows[0].get("compile_time_s"),
        "loss_first_interval": rows[0]["loss"],
        "loss_last_interval": rows[-1]["loss"],
        "mse_first_interval": rows[0]["mse"],
        "mse_last_interval": rows[-1]["mse"],
        "samples": [str(s).replace(str(workdir), "<workdir>") for s in out["samples"]],
        **{k: round(v, 4) for k, v in scores.items()},
        "chance": 0.1,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
