"""Reliability (docs/reliability.md): non-finite steps, stop signals, exact resume, damaged and
mismatched checkpoints, config validation. The bad-input table is tests/bad_inputs_test.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO
from helpers import folder_digest, quiet, read_and_react, smoke_config, tree_bytes

from scm_jax.config import checks as config_checks
from scm_jax.config import defaults, validate
from scm_jax.data.arrays import batch_indices
from scm_jax.run.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    join_state,
)
from scm_jax.train.loop import train
from scm_jax.train.stopping import NonfiniteGuard, NonfiniteStepsError
from scm_jax.train.writers import read_metrics

BATCH = 8  # toy_gmm:smoke


def points_npz(path: Path, nan_steps: tuple[int, ...] = (), n: int = 64, seed: int = 0) -> Path:
    """2-D points in model units; one example of each batch in ``nan_steps`` (0-based batch
    index, seed 0's data order) set to NaN."""
    x = np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32) * 0.5
    for k in nan_steps:
        idx, _ = batch_indices(k, n, BATCH, seed=0)
        x[idx[3]] = np.nan
    np.savez(path, x=x)
    return path


def toy_on(data: Path, steps: int, **overrides):
    """The toy smoke config (sCT) on an npz of points, ``steps`` steps, logging every step."""
    return smoke_config("toy_gmm:smoke", steps=steps, **{
        "dataset.source": "npz", "dataset.path": str(data), "dataset.num_examples": 0,
        "train.sample_every_kimg": 0.0, **overrides})  # fmt: skip


def restore_raw(workdir: Path, step: int) -> dict:
    """The ``state`` and ``emas`` items of a checkpoint as saved (no target)."""
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), emas=ocp.args.StandardRestore()))  # fmt: skip
    finally:
        ckpt.close()


# ---------------------------------------------------------------------------- non-finite steps


def test_guard_counts_one_step_late_and_stops_after_k_in_a_row():
    lines: list[str] = []
    guard = NonfiniteGuard(3, log=lines.append)
    stops = []
    for s, bad in enumerate([0, 1, 1, 0, 1, 1, 1, 0], start=1):
        stops.append(guard.after_step(s, {"nonfinite_steps": jnp.float32(bad)}))
        if stops[-1]:
            break
    # Step 7 completes the run of three; it is read after step 8 was dispatched.
    assert stops == [False] * 7 + [True]
    assert (guard.total, guard.in_a_row, guard.first_bad_step) == (5, 3, 5)
    assert guard.sync() is False  # step 8 was good: the run of skipped steps ended
    assert (guard.total, guard.in_a_row) == (5, 0)
    assert lines[0] == ("step 2: loss or gradient not finite; step skipped, parameters unchanged "
                        "(1 in a row, 1 in total)")  # fmt: skip
    assert len(lines) == 5
    never = NonfiniteGuard(0, total=2, in_a_row=1, log=quiet)
    for s in range(10):
        assert not never.after_step(s, {"nonfinite_steps": jnp.float32(1)})
    assert never.sync() is False and (never.total, never.in_a_row) == (12, 11)


@pytest.mark.slow
def test_nan_gradient_at_step_k_equals_a_run_that_skipped_step_k(tmp_path):
    """A NaN example in batch k makes step k's gradient NaN: the step is skipped (counter 1), and
    the run ends with exactly the state of a run whose step k was a no-op.

    "Skipped" means: parameters, Adam state and EMAs unchanged, the step counter advanced
    (so the next step takes batch k + 1, draws its noise from fold_in(key, k + 1) and uses the
    learning rate of step k + 1). The reference run trains k steps, then its checkpoint is
    re-saved as step k + 1 (nothing else changed) and resumed to the end."""
    n, k = 5, 2
    data = points_npz(tmp_path / "points.npz", nan_steps=(k,))
    lines: list[str] = []
    out = train(toy_on(data, n), tmp_path / "a", log=lines.append)
    assert out["step"] == n and out["nonfinite_steps_total"] == 1
    assert f"step {k + 1}: loss or gradient not finite; step skipped, parameters unchanged (1 in " \
           "a row, 1 in total)" in lines  # fmt: skip
    rows = read_metrics(tmp_path / "a")
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 0, 0]
    assert [r["nonfinite_steps_total"] for r in rows] == [0, 0, 1, 1, 1]
    assert "loss" not in rows[k]  # the skipped step's NaN loss is kept out of the averages

    train(toy_on(data, k), tmp_path / "b", log=quiet)  # steps 0 .. k-1
    raw = restore_raw(tmp_path / "b", k)
    noop = join_state(raw["state"], raw["emas"]).replace(step=jnp.int32(k + 1))
    ckpt = Checkpointer(tmp_path / "b")
    meta = {**ckpt.read_meta(k), "step": k + 1, "nimg": (k + 1) * BATCH}
    ckpt.save(noop, meta)
    ckpt.close()
    train(toy_on(data, n), tmp_path / "b", log=quiet)  # steps k+1 .. n-1

    a, b = restore_raw(tmp_path / "a", n), restore_raw(tmp_path / "b", n)
    assert tree_bytes(a["state"]) == tree_bytes(b["state"])
    assert tree_bytes(a["emas"]) == tree_bytes(b["emas"])
    assert Checkpointer(tmp_path / "a", read_only=True).read_meta()["nonfinite_steps_total"] == 1


def test_k_skipped_steps_in_a_row_stop_with_the_last_good_state(tmp_path):
    """Batches 2, 3, 4, ... hold a NaN: with K = 2 the run stops, checkpoints and raises; the
    checkpoint's parameters, Adam state and EMAs are those of step 2 (the last good one)."""
    data = points_npz(tmp_path / "points.npz", nan_steps=(2, 3, 4, 5, 6, 7))
    cfg = toy_on(data, 8, **{"train.max_consecutive_nonfinite": 2, "train.keep_checkpoints": 9,
                             "train.ckpt_every_kimg": 2 * BATCH / 1000})  # fmt: skip
    with pytest.raises(NonfiniteStepsError) as e:
        train(cfg, tmp_path / "run", log=quiet)
    # Steps 3 and 4 are skipped. This config logs every step, and logging reads the counts
    # (it waits for the step anyway), so the stop comes right at step 4 (lag: the unit test).
    assert str(e.value).startswith("stopped at step 4: the last 2 steps (from step 3) had a "
                                   "non-finite loss or gradient and were skipped")  # fmt: skip
    assert "holds the parameters of step 2, the last good one" in str(e.value)
    ckpt = Checkpointer(tmp_path / "run", read_only=True)
    assert ckpt.all_steps() == [2, 4]
    meta = ckpt.read_meta(4)
    assert (meta["nonfinite_steps_total"], meta["nonfinite_in_a_row"]) == (2, 2)
    good, stop = restore_raw(tmp_path / "run", 2), restore_raw(tmp_path / "run", 4)
    for item in ("params", "opt_state"):
        assert tree_bytes(good["state"][item]) == tree_bytes(stop["state"][item])
    assert tree_bytes(good["emas"]) == tree_bytes(stop["emas"])
    assert int(stop["state"]["step"]) == 4
    # A resume continues the count (from the checkpoint's meta): step 5 makes three in a row.
    with pytest.raises(NonfiniteStepsError, match="stopped at step 5: the last 3 steps"):
        train(cfg, tmp_path / "run", log=quiet)


# ------------------------------------------------------------------------- signals and resume


def _toy_train_process(workdir: Path, steps: int, *options: str) -> subprocess.Popen:
    """``python -m scm_jax train`` of ``toy_gmm:smoke`` for ``steps`` steps, output piped; the
    same XLA flags and options as this process (conftest), so the programs are the same."""
    args = ["--config", "toy_gmm:smoke", f"--config.total_kimg={steps * BATCH / 1000}",
            "--config.train.sample_every_kimg=0", *options]  # fmt: skip
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "scm_jax", "train", *args, "--workdir", str(workdir)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_sigterm_after_the_output_pipe_closed_still_checkpoints(tmp_path):
    """``scm-jax train ... | tee log`` and Ctrl-C: the reader dies first, then the trainer gets
    the signal. Its next progress line meets a broken pipe; the run must still finish the step,
    write its checkpoint and exit with 128 + 15, not die in ``print`` and lose the steps."""
    steps = 400
    every_step = f"--config.train.log_every_kimg={BATCH / 1000}"
    no_ckpt = "--config.train.ckpt_every_kimg=0"
    proc = _toy_train_process(tmp_path / "run", steps, every_step, no_ckpt)
    try:
        for line in proc.stdout:  # progress after compilation: the run is stepping
            if line.startswith("step "):
                break
        proc.stdout.close()  # the reader goes away; the trainer keeps logging every step
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    saved = Checkpointer(tmp_path / "run", read_only=True).all_steps()
    assert len(saved) == 1 and 1 <= saved[0] < steps, saved


@pytest.mark.slow
def test_sigterm_to_a_training_process_then_resume_equals_an_uninterrupted_run(tmp_path):
    """``python -m scm_jax train`` gets SIGTERM mid-run: it finishes the step, checkpoints and
    exits with 128 + 15; resuming reaches bit-identical parameters, Adam state and EMAs."""
    steps = 120
    proc = _toy_train_process(tmp_path / "cut", steps,
                              f"--config.train.log_every_kimg={10 * BATCH / 1000}")  # fmt: skip

    def react(line: str) -> bool:  # wait for progress (after compilation), then preempt
        if line.startswith("step "):
            proc.send_signal(signal.SIGTERM)
            return True
        return False

    text = read_and_react(proc, react)
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "Traceback" not in text
    stopped = [ln for ln in text.splitlines() if ln.startswith("stopped by signal 15 at step ")]
    assert stopped, text[-3000:]
    cut = int(stopped[0].split()[6].rstrip(";"))
    assert 10 <= cut < steps
    assert Checkpointer(tmp_path / "cut", read_only=True).all_steps() == [cut]

    cfg = defaults.load_config("toy_gmm:smoke")
    with cfg.unlocked():
        cfg.total_kimg = steps * BATCH / 1000
        cfg.train.log_every_kimg = 10 * BATCH / 1000
        cfg.train.sample_every_kimg = 0.0
    lines: list[str] = []
    assert train(cfg, tmp_path / "cut", log=lines.append)["step"] == steps
    assert f"resumed {tmp_path / 'cut'} at step {cut} ({cut * BATCH / 1000:.1f} kimg)" in lines
    assert train(cfg, tmp_path / "straight", log=quiet)["step"] == steps
    a, b = restore_raw(tmp_path / "straight", steps), restore_raw(tmp_path / "cut", steps)
    assert tree_bytes(a["state"]) == tree_bytes(b["state"])
    assert tree_bytes(a["emas"]) == tree_bytes(b["emas"])


@pytest.mark.slow
def test_preemption_of_one_host_stops_every_process_at_the_same_step(tmp_path):
    """2 processes x 4 CPU devices; SIGTERM reaches process 1 only. JAX's preemption service
    (not a Python handler: it would replace JAX's notifier) picks a step both reach; both
    checkpoint that step together and exit with 128 + 15."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for i in range(2):
        env = {**os.environ, "SCM_JAX_COORDINATOR": f"127.0.0.1:{port}",
               "SCM_JAX_NUM_PROCESSES": "2", "SCM_JAX_PROCESS_ID": str(i),
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
               "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "scm_jax", "train", "--config", "toy_gmm:smoke",
             "--config.total_kimg=16", "--config.train.log_every_kimg=0.4",
             "--config.train.sample_every_kimg=0", "--workdir", str(tmp_path / "run")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    try:
        for line in procs[0].stdout:  # progress (after compilation): preempt process 1 only
            if line.startswith("step "):
                procs[1].send_signal(signal.SIGTERM)
                break
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [143, 143], outs[0][-2000:] + outs[1][-2000:]
    assert "SIGTERM caught" in outs[1] and "Traceback" not in outs[0] + outs[1]
    stopped = [ln for ln in outs[0].splitlines() if ln.startswith("stopped by signal 15 at step")]
    assert len(stopped) == 1, outs[0][-2000:]
    step = int(stopped[0].split()[6].rstrip(";"))
    assert 50 <= step < 2000
    ckpt = Checkpointer(tmp_path / "run", read_only=True)
    assert ckpt.all_steps() == [step] and ckpt.read_meta()["step"] == step


# ------------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    """The newest checkpoint's array data truncated: training resumes from the previous one
    with a warning, keeps the damaged one as ``<step>.damaged`` (bytes unchanged), and ends
    where a run without the damage ends; a half-written (temporary) checkpoint is ignored."""
    data = points_npz(tmp_path / "points.npz")
    cfg = toy_on(data, 6, **{"train.ckpt_every_kimg": 2 * BATCH / 1000})
    run = tmp_path / "run"
    train(cfg, run, log=quiet)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "6"]
    # orbax writes <step>.orbax-checkpoint-tmp-* and renames it when complete: one left by a
    # kill mid-save is never taken as the latest.
    shutil.copytree(ckpts / "6", ckpts / "8.orbax-checkpoint-tmp-1796000000")
    for item in ("state", "emas"):  # truncate the merged OCDBT data files of both items
        for f in (ckpts / "6" / item / "d").iterdir():
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    damaged = folder_digest(ckpts / "6")

    import scm_jax  # readers fall back too, with a warning on stderr

    capsys.readouterr()
    sampler = scm_jax.load_sampler(run)
    assert sampler.sample(0, 2, steps=1).shape == (2, 2)
    err = capsys.readouterr().err
    assert f"warning: checkpoint {ckpts / '6'} is damaged and was not used" in err
    assert "trying step 4" in err

    lines: list[str] = []
    cfg8 = toy_on(data, 8, **{"train.ckpt_every_kimg": 2 * BATCH / 1000})
    assert train(cfg8, run, log=lines.append)["step"] == 8
    warn = [ln for ln in lines if ln.startswith("warning: checkpoint")]
    assert len(warn) == 1 and "checkpoints/6 is damaged and was not used" in warn[0]
    assert "OUT_OF_RANGE" in warn[0] and warn[0].endswith("trying step 4")
    assert any(ln == f"resumed {run} at step 4 (0.0 kimg)" for ln in lines), lines
    assert f"  kept the damaged checkpoint as {ckpts / '6.damaged'} (not deleted)" in lines
    assert folder_digest(ckpts / "6.damaged") == damaged  # set aside, not deleted or changed
    assert Checkpointer(run, read_only=True).all_steps() == [4, 6, 8]

    straight = tmp_path / "straight"
    train(cfg8, straight, log=quiet)
    a, b = restore_raw(straight, 8), restore_raw(run, 8)
    assert tree_bytes(a["state"]) == tree_bytes(b["state"])


def test_checkpoint_of_another_run_is_refused_naming_the_difference(tmp_path):
    """Without (or despite) config.json, a checkpoint's meta identity is checked first."""
    data = points_npz(tmp_path / "points.npz")
    run = tmp_path / "run"
    train(toy_on(data, 1), run, log=quiet)
    (run / "config.json").unlink()  # e.g. checkpoints copied without their config
    for overrides, message in [
        ({"model.hidden": 64}, "model.hidden: 32 there, 64 here"),
        ({"objective": "diffusion"}, "objective: 'sct' there, 'diffusion' here"),
    ]:
        before = folder_digest(run)
        with pytest.raises(CheckpointMismatchError) as e:
            train(toy_on(data, 2, **overrides), run, log=quiet)
        assert message in str(e.value) and "belongs to a run with another config" in str(e.value)
        assert folder_digest(run) == before  # nothing written
    # A checkpoint written before meta recorded the identity: objective and batch still checked.
    ckpt = Checkpointer(run, read_only=True)
    meta = ckpt.read_meta()
    old = {k: v for k, v in meta.items() if k != "identity"}
    cfg = toy_on(data, 2, objective="diffusion")
    ckpt.read_meta = lambda step=None: old  # as an older checkpoint's meta reads
    with pytest.raises(CheckpointMismatchError, match="objective: 'sct' there, 'diffusion' here"):
        ckpt.check_identity(cfg, 1)
    ckpt.check_identity(toy_on(data, 2, **{"model.hidden": 64}), 1)  # not recorded: passes
    ckpt.close()


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["toy_gmm", "mnist", "cifar10", "imagenet64", "imagenet512"])
def test_every_shipped_config_passes_validation(name):
    for objective in defaults.OBJECTIVES:
        for smoke in ("", ",smoke"):
            cfg = defaults.load_config(f"{name}:objective={objective}{smoke}")
            found = validate.problems(cfg, check_paths=False)
            needs_paths = ("sCD needs a teacher", "dataset.source='latents' needs")
            assert [p for p in found if not p.startswith(needs_paths)] == [], (name, objective)


def test_validation_lists_every_problem_one_line_each():
    cfg = defaults.load_config("mnist:smoke")
    with cfg.unlocked():
        cfg.trigflow.P_std = 0.0
        cfg.model.dropout = 1.0
        cfg.loss.tangent_c = -0.1
        cfg.trigflow.t_mid = 1.6
        cfg.optim.name = "sgd"
        cfg.batch_size = 6
        cfg.train.micro_batches = 4
        cfg.train.keep_checkpoints = 0
        cfg.mesh.fsdp = 0
        cfg.ema.power_std = (0.5,)
        cfg.evals.teacher_nfe = 4
        cfg.model.typo = 1
        cfg.newsection = {"anything": 1}  # a section no table knows: left alone
    with pytest.raises(validate.ConfigError) as e:
        validate.validate(cfg)
    lines = str(e.value).splitlines()
    assert lines[0] == "11 problems in the config:" and len(lines) == 12
    for fragment in ["trigflow.P_std=0.0: must be > 0", "model.dropout=1.0: must be >= 0 and < 1",
                     "loss.tangent_c=-0.1: must be > 0",
                     "trigflow.t_mid=1.6: must be in (0, t_max) = (0, 1.56455)",
                     "optim.name='sgd': must be one of 'adam', 'radam'",
                     "batch_size=6 is not divisible by train.micro_batches=4",
                     "train.keep_checkpoints=0: must be >= 1",
                     "mesh.fsdp=0: must be an integer >= 1 or -1",
                     "ema.power_std=(0.5,): item 0 must be > 0 and < 0.288675",
                     "evals.teacher_nfe=4: the Heun sampler makes 2N - 1 evaluations",
                     "unknown key(s) model.typo; known: arch,"]:  # fmt: skip
        assert sum(fragment in ln for ln in lines) == 1, fragment
    assert isinstance(e.value, ValueError) and len(e.value.problems) == 11


def test_new_sections_register_their_checks():
    cfg = defaults.load_config("toy_gmm:smoke")
    with cfg.unlocked():
        cfg.newobjective = {"fake_lr": -1.0, "typo": 0}
    assert validate.problems(cfg) == []  # unknown section: not refused here
    saved = dict(validate.SECTIONS)
    try:
        validate.register_section("newobjective", {"fake_lr": config_checks.real(gt=0)})
        assert validate.problems(cfg) == [
            "newobjective.fake_lr=-1.0: must be > 0",
            "unknown key(s) newobjective.typo; known: fake_lr",
        ]
    finally:
        validate.SECTIONS.clear()
        validate.SECTIONS.update(saved)


def test_config_check_command(capsys):
    from scm_jax import cli

    assert cli.main(["config", "--config", "toy_gmm:smoke", "--check"]) == 0
    assert capsys.readouterr().out.startswith("ok: the config passes")
    code = cli.main(["config", "--config", "toy_gmm:smoke", "--check",
                     "--config.trigflow.P_std=0", "--config.model.dropout=1.5"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        "scm-jax config: error: 2 problems in the config:",
        "  model.dropout=1.5: must be >= 0 and < 1",
        "  trigflow.P_std=0.0: must be > 0",
    ]
