"""The training system end to end on a CPU: every config's smoke run, sCD from a trained teacher,
resume after a kill (bit-identical), sharded initialisation, and the errors a user can cause."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import folder_digest, quiet, smoke_config, tree_bytes

from scm_jax import cli
from scm_jax.config import defaults
from scm_jax.train.loop import train
from scm_jax.train.writers import read_metrics


@pytest.fixture(scope="module")
def mnist_teacher(tmp_path_factory) -> Path:
    """A 2-step diffusion (teacher) run of the MNIST smoke config."""
    workdir = tmp_path_factory.mktemp("runs") / "teacher"
    out = train(smoke_config("mnist:smoke,objective=diffusion"), workdir, log=quiet)
    assert out["step"] == 2
    return workdir


@pytest.mark.parametrize(
    "spec", ["toy_gmm:smoke", "mnist:smoke", "cifar10:smoke", "imagenet64:smoke,objective=scd",
             "imagenet512:smoke,objective=diffusion"],
)  # fmt: skip
def test_smoke_configs_train_two_steps(spec, tmp_path):
    """Every config's smoke version trains two steps and writes what a run writes."""
    cfg = smoke_config(spec)
    if cfg.objective == "scd" and cfg.teacher.get("kind") != "exact_gmm":
        teacher = tmp_path / "teacher"
        train(smoke_config(spec.replace("objective=scd", "objective=diffusion")), teacher,
              log=quiet)  # fmt: skip
        with cfg.unlocked():
            cfg.teacher.workdir = str(teacher)
    out = train(cfg, tmp_path / "run", log=quiet)
    assert out["step"] == 2 and out["interrupted"] is None
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in rows)
    assert (tmp_path / "run" / "config.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    kinds = {Path(p).name.split("_", 1)[1] for p in out["samples"]}
    expected = {"heun18.png"} if cfg.objective == "diffusion" else {"1step.png", "2step.png"}
    if spec.startswith("toy_gmm"):
        expected = {k.replace(".png", ".npz") for k in expected}
    assert kinds == expected


def test_scd_from_teacher_with_cfg_and_sampler(mnist_teacher, tmp_path):
    """sCD starts the student from the teacher's EMA; the sampler API and CLI read the run."""
    cfg = smoke_config("mnist:smoke,objective=scd", **{"teacher.workdir": str(mnist_teacher)})
    lines: list[str] = []
    out = train(cfg, tmp_path / "scd", log=lines.append)
    assert out["step"] == 2
    assert any("student initialised from the teacher" in ln for ln in lines)

    import scm_jax

    sampler = scm_jax.load_sampler(tmp_path / "scd")
    x = sampler.sample(0, 5, steps=2, labels=[0, 1, 2, 3, 4])
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.float32
    assert -1 <= x.min() and x.max() <= 1
    np.testing.assert_array_equal(x, sampler.sample(0, 5, steps=2, labels=[0, 1, 2, 3, 4]))
    t = np.full((5,), 1.0, np.float32)
    f = np.asarray(sampler.consistency(x, t, labels=[0, 1, 2, 3, 4]))
    F = np.asarray(sampler.network(x / 0.5, t, labels=[0, 1, 2, 3, 4]))
    np.testing.assert_allclose(f, np.cos(1.0) * x - np.sin(1.0) * 0.5 * F, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="labels must lie"):
        sampler.sample(0, 2, labels=[0, 10])

    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert cli.main(["sample", "--workdir", str(tmp_path / "scd"), "--steps", "1", "--num",
                     "6", "--labels", "0-2", "--out", str(png)]) == 0  # fmt: skip
    assert png.stat().st_size > 0
    assert cli.main(["sample", "--workdir", str(tmp_path / "scd"), "--num", "3", "--out",
                     str(npz)]) == 0  # fmt: skip
    with np.load(npz) as f_npz:
        assert f_npz["x"].shape == (3, 28, 28, 1)
    # A diffusion run samples with the ODE sampler (steps = Heun steps).
    teacher = scm_jax.load_sampler(mnist_teacher)
    assert teacher.sample(1, 2, steps=3).shape == (2, 28, 28, 1)


def test_bad_input_gives_one_clear_error_and_overwrites_nothing(mnist_teacher, tmp_path, capsys):
    """Missing data, a config typo, sCD without or with a wrong teacher, another run's workdir."""
    before = folder_digest(mnist_teacher)
    cases = [
        (["--config", "cifar10:smoke", "--config.dataset.source=image_folder"], "dataset.path"),
        (["--config", "cifar10:smoke", "--config.dataset.source=image_folder",
          "--config.dataset.path=/nonexistent/cifar"], "/nonexistent/cifar"),
        (["--config", "mnist:smoke", "--config.optim.lrr=1"], "unknown config field 'optim.lrr'"),
        (["--config", "mnist:smoke,objective=scd"], "sCD needs a teacher"),
        (["--config", "cifar10:smoke,objective=scd",
          f"--config.teacher.workdir={mnist_teacher}"], "another architecture"),
        (["--config", "mnist:smoke,objective=scd",
          f"--config.teacher.workdir={tmp_path / 'none'}"], "not a training run's folder"),
    ]  # fmt: skip
    for args, message in cases:
        capsys.readouterr()
        code = cli.main(["train", *args, "--workdir", str(tmp_path / "new")])
        err = capsys.readouterr().err.strip()
        assert code == 2, args
        assert err.startswith("scm-jax train: error:") and message in err, err
        assert len(err.splitlines()) == 1, err
        assert not (tmp_path / "new").exists()
    # The teacher's workdir holds another config's checkpoint: refused, nothing changed.
    code = cli.main(["train", "--config", "mnist:smoke,objective=sct", "--workdir",
                     str(mnist_teacher)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "holds checkpoints of a run with another config" in err
    assert "objective: 'diffusion' -> 'sct'" in err
    assert folder_digest(mnist_teacher) == before


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(tmp_path, optimized):
    """N steps straight == N/2 steps, SIGTERM, resume for the other N/2 (params, EMAs, Adam)."""
    n = 6
    cfg = smoke_config("mnist:smoke", steps=n, **{"train.sample_every_kimg": 0.0})
    straight = train(cfg, tmp_path / "straight", log=quiet)

    def kill_at_half(line: str) -> None:
        if line.startswith(f"step {n // 2}/"):
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(cfg, tmp_path / "resumed", log=kill_at_half)
    assert first["interrupted"] == signal.SIGTERM and first["step"] == n // 2
    second = train(cfg, tmp_path / "resumed", log=quiet)
    assert second["step"] == n and straight["step"] == n

    from scm_jax.run.checkpoint import Checkpointer

    a, b = Checkpointer(tmp_path / "straight"), Checkpointer(tmp_path / "resumed")
    assert b.all_steps() == [n // 2, n]
    ma, mb = a.read_meta(), b.read_meta()
    assert ma["step"] == mb["step"] == n
    import orbax.checkpoint as ocp

    ra = a.manager.restore(n, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      emas=ocp.args.StandardRestore()))  # fmt: skip
    rb = b.manager.restore(n, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      emas=ocp.args.StandardRestore()))  # fmt: skip
    assert tree_bytes(ra["state"]) == tree_bytes(rb["state"])
    assert tree_bytes(ra["emas"]) == tree_bytes(rb["emas"])
    la = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "resumed")]
    assert la == lb


@pytest.mark.slow
def test_train_state_is_created_sharded(tmp_path):
    """Params, Adam moments and EMAs are created FSDP-sharded: 1/8 of each leaf per device."""
    from scm_jax.networks import build_network
    from scm_jax.optim import make_optimizer
    from scm_jax.run.state import create_sharded_state, init_state
    from scm_jax.sharding import make_mesh

    cfg = defaults.load_config("mnist:smoke")
    nd = build_network(cfg.model)
    tx, _ = make_optimizer(**cfg.optim, batch_size=8)
    mesh = make_mesh(data=1, fsdp=8)

    def make(key, init_net):
        return init_state(nd, tx, key, power_std=(0.05, 0.1), halflife_kimg=1.0,
                          init_net=init_net, per_leaf=True)  # fmt: skip

    state, shardings = create_sharded_state(make, mesh, jax.random.key(0), None)
    assert set(state.emas) == {"power_0.050", "power_0.100", "halflife"}
    n_sharded = n_matrices = 0
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.spec == sh.spec
        n_matrices += leaf.ndim >= 2
        if "fsdp" in sh.spec:
            n_sharded += 1
            assert all(s.data.size == leaf.size // 8 for s in leaf.addressable_shards)
    assert n_sharded >= 0.8 * n_matrices
    assert state.step.sharding.spec == jax.sharding.PartitionSpec()  # replicated


@pytest.mark.slow
def test_absl_main_and_init_from(mnist_teacher, tmp_path):
    """``python -m scm_jax.main`` trains a config, here starting from another run's EMA."""
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "scm_jax.main", "--config=configs/mnist.py:smoke",
           f"--workdir={tmp_path / 'run'}", "--config.total_kimg=0.016",
           f"--config.init_from={mnist_teacher}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"initialised from {mnist_teacher} (EMA halflife)" in proc.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-1] == 2
    proc = subprocess.run([*cmd[:3], f"--workdir={tmp_path / 'x'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode != 0 and "sCD" not in proc.stderr  # missing --config: absl usage
