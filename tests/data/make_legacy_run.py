"""Write ``tests/data/legacy_run/``: a small run, its export and its samples, made by the code of
the commit that wrote them (``legacy_run/MADE_BY``), so that later refactors are checked
against files they did not write (``tests/legacy_run_test.py``).

    python tests/data/make_legacy_run.py     # only to replace the fixture on purpose

The run: ``configs/toy_gmm.py:smoke`` (sCT on the 2-d mixture), 3 classes, 2 steps of 8,
one checkpoint; the export: ``scm-jax export --to safetensors``; the samples: 16 at seed 0 with
1 and 2 steps from the run and from the export.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUT = HERE / "legacy_run"
NUM, SEED, STEPS = 16, 0, (1, 2)


def main() -> None:
    import numpy as np

    from scm_jax import cli
    from scm_jax.config import defaults
    from scm_jax.run.sampler import load_sampler
    from scm_jax.train.loop import train

    if OUT.exists():
        shutil.rmtree(OUT)
    cfg = defaults.load_config("toy_gmm:smoke")
    with cfg.unlocked():
        cfg.dataset.source = "synthetic"
        cfg.dataset.num_classes = cfg.model.num_classes = 3
        cfg.total_kimg = 2 * cfg.batch_size / 1000
        cfg.train.sample_every_kimg = 0
    train(cfg, OUT / "run", log=lambda line: None)
    for junk in ("tensorboard", "samples"):
        shutil.rmtree(OUT / "run" / junk, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):
        argv = ["export", "--workdir", str(OUT / "run"), "--to", "safetensors"]
        assert cli.main([*argv, "--out", str(OUT / "export")]) == 0
    samples = {}
    for where in ("run", "export"):
        sampler = load_sampler(OUT / where)
        for steps in STEPS:
            samples[f"{where}_{steps}step"] = sampler.sample(SEED, NUM, steps=steps)
    np.savez(OUT / "samples.npz", **samples)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    import jax

    (OUT / "MADE_BY").write_text(f"commit {commit}\njax {jax.__version__}\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
