"""A run and an export written by an earlier commit (``tests/data/legacy_run``, see its
``MADE_BY`` and ``tests/data/make_legacy_run.py``) still load, sample identically, resume and
export with today's code: refactors of the run's files, the sampler or the network cannot
silently change what users' existing checkpoints and exports mean."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scm_jax import cli
from scm_jax.run.sampler import load_sampler

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_run"
NUM, SEED = 16, 0


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(LEGACY / "samples.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("where", ["run", "export"])
@pytest.mark.parametrize("steps", [1, 2])
def test_the_legacy_run_and_export_sample_as_they_did(where, steps, expected):
    sampler = load_sampler(LEGACY / where)
    x = sampler.sample(SEED, NUM, steps=steps)
    # same weights, same noise; XLA may reorder float sums across versions: 1e-5 of a unit
    np.testing.assert_allclose(x, expected[f"{where}_{steps}step"], rtol=0, atol=1e-5)


def test_the_legacy_run_resumes_and_exports(tmp_path, expected):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "run", run)
    cfg = json.loads((run / "config.json").read_text())
    steps_done = round(cfg["total_kimg"] * 1000 / cfg["batch_size"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(["train", "--config", "toy_gmm:smoke", "--workdir", str(run),
                         "--config.dataset.source=synthetic", "--config.dataset.num_classes=3",
                         "--config.model.num_classes=3", "--config.train.sample_every_kimg=0",
                         f"--config.total_kimg={2 * cfg['total_kimg']}"])  # fmt: skip
    assert code == 0, out.getvalue()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * steps_done
    with contextlib.redirect_stdout(io.StringIO()):
        argv = ["export", "--workdir", str(LEGACY / "run"), "--to", "safetensors"]
        assert cli.main([*argv, "--out", str(tmp_path / "export")]) == 0
    from safetensors import safe_open

    # the same tensors and metadata (the header's key order is not fixed: safetensors' own map)
    with (
        safe_open(tmp_path / "export" / "model.safetensors", "np") as new,
        safe_open(LEGACY / "export" / "model.safetensors", "np") as old,
    ):
        assert new.metadata() == old.metadata() and sorted(new.keys()) == sorted(old.keys())
        for k in old.keys():
            assert new.get_tensor(k).tobytes() == old.get_tensor(k).tobytes(), k
