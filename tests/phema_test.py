"""EDM2 post-hoc EMA: the exact discrete profiles and their inner products, the least-squares
reconstruction (a stored profile comes back as its snapshot; a polynomial trajectory's EMA of an
intermediate sigma_rel matches the one tracked directly), snapshots written by training and kept
consistent across resumes, and ``scm-jax phema`` end to end with its errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import quiet, smoke_config

from scm_jax import cli, ema, phema
from scm_jax.run import snapshots as snap_lib
from scm_jax.train.loop import train

STORED = (0.05, 0.10)


def brute_profiles(gammas, steps) -> np.ndarray:
    """(N, max step) matrix of the discrete profiles, written out with step_profile."""
    out = np.zeros((len(gammas), max(steps)))
    for i, (g, s) in enumerate(zip(gammas, steps, strict=True)):
        out[i, :s] = phema.step_profile(g, s)
    return out


# ----------------------------------------------------------------------------------- the math


def test_inner_products_are_exact_and_tend_to_edm2_closed_form():
    gammas = [ema.power_exponent(s) for s in (0.03, *STORED, 0.2)]
    steps = [1, 3, 10, 17, 40]
    g, s = np.repeat(gammas, len(steps)), np.tile(steps, len(gammas))
    W = brute_profiles(g, s)
    np.testing.assert_allclose(W.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(phema.inner_products(g, s, g, s), W @ W.T, rtol=1e-10, atol=1e-15)
    # Against EDM2's continuous profile: each step's weight is its integral over the step.
    t = np.linspace(0, 40, 40 * 200 + 1)
    p = phema.continuous_profile(gammas[1], t, 40.0)
    per_step = [np.trapezoid(p[k * 200 : (k + 1) * 200 + 1], t[k * 200 : (k + 1) * 200 + 1])
                for k in range(40)]  # fmt: skip
    np.testing.assert_allclose(per_step, phema.step_profile(gammas[1], 40), atol=2e-6)
    # Long runs: the discrete inner products / batch -> the closed form (EDM2 Eq. 151).
    batch, long_steps = 4, np.tile([20_000, 50_000, 100_000], 2)
    gl = np.repeat(gammas[1:3], 3)
    exact = phema.inner_products(gl, long_steps, gl, long_steps) / batch
    closed = phema.continuous_inner_products(gl, batch * long_steps, gl, batch * long_steps)
    np.testing.assert_allclose(exact, closed, rtol=1e-4)


def test_stored_profile_solves_to_one_hot():
    """A stored profile at a stored time: the coefficients are that snapshot's, exactly;
    other widths at snapshot times are reconstructed with small profile errors."""
    steps = [10, 20, 30, 40, 50]
    sig, st = np.repeat(STORED, len(steps)), np.tile(steps, len(STORED))
    sol = phema.solve_coefficients(sig, st, [0.10, 0.05], [30, 50])
    onehot = np.zeros((len(sig), 2))
    onehot[len(steps) + 2, 0] = onehot[len(steps) - 1, 1] = 1.0
    np.testing.assert_allclose(sol.coefficients, onehot, atol=1e-8)
    assert np.all(sol.error < 1e-6)
    sol = phema.solve_coefficients(sig, st, [0.07, 0.08], [50, 40])
    np.testing.assert_allclose(sol.coefficients.sum(0), 1.0)
    assert np.all(sol.error < 0.03) and np.all(sol.error > 1e-4)  # approximations, not exact
    g = [ema.power_exponent(s) for s in (*sig, 0.07)]
    W = brute_profiles(g, [*st, 50])
    resid = W[-1] - sol.coefficients[:, 0] @ W[:-1]
    assert np.linalg.norm(resid) / np.linalg.norm(W[-1]) == pytest.approx(sol.error[0], rel=1e-6)


def test_polynomial_trajectory_matches_the_directly_tracked_ema():
    """theta(n) = (1, u, u^2, u^3, sin 3u), u = n / N, through the real update_emas with the
    stored profiles and sigma_rel 0.075 tracked directly; the reconstruction of 0.075 from
    snapshots of 0.05 and 0.10 every 10 steps matches it (and the exact discrete profile applied
    to theta), 1000 x closer than either stored EMA is."""
    batch, steps, every, target = 4, 200, 10, 0.075
    power_std = (*STORED, target)
    n_total = steps * batch

    def theta(n):
        u = jnp.float32(n) / n_total
        return {"w": jnp.stack([1.0 + 0 * u, u, u**2, u**3, jnp.sin(3 * u)])}

    emas = ema.init_emas(theta(0), power_std, 0.0)
    update = jax.jit(lambda e, p, n: ema.update_emas(e, p, n, batch, power_std, 0.0))
    snaps, history = [], []
    for k in range(1, steps + 1):
        params = theta(k * batch)
        history.append(np.asarray(params["w"], np.float64))
        emas = update(emas, params, jnp.float32(k * batch))
        if k % every == 0:
            snaps += [(k, s, np.asarray(emas[f"power_{s:.3f}"]["w"])) for s in STORED]
    direct = np.asarray(emas[f"power_{target:.3f}"]["w"])
    exact = phema.step_profile(ema.power_exponent(target), steps) @ np.stack(history)
    np.testing.assert_allclose(direct, exact, atol=5e-7)  # float32 updates vs the profile
    sol = phema.solve_coefficients([s for _, s, _ in snaps], [k for k, _, _ in snaps], [target],
                                   [steps])  # fmt: skip
    rec = phema.weighted_sum([w for _, _, w in snaps], sol.coefficients[:, 0])
    assert rec.dtype == np.float32 and rec.shape == (5,)
    np.testing.assert_allclose(rec, direct, atol=4e-5)
    for s in STORED:
        assert np.abs(snaps[-1 if s == STORED[1] else -2][2] - direct).max() > 0.05


def test_weighted_sum_of_trees():
    trees = [{"a": np.full(3, float(i), np.float32), "b": {"c": np.ones((2,), np.float32) * i}}
             for i in range(1, 4)]  # fmt: skip
    out = phema.weighted_sum(trees, [0.5, -1.0, 1.5])
    np.testing.assert_allclose(out["a"], 0.5 - 2 + 4.5)
    assert out["b"]["c"].dtype == np.float32
    with pytest.raises(ValueError, match="3 trees but 2 coefficients"):
        phema.weighted_sum(trees, [1.0, 0.0])


# ------------------------------------------------------------------------------ with training


def snapshot_config(steps: int, every: int, **overrides):
    """The toy smoke config with EMAs 0.05 / 0.10 snapshotted every ``every`` steps."""
    kimg = 8 / 1000  # one step of the smoke batch (8)
    return smoke_config("toy_gmm:smoke", steps=steps, **{
        "ema.power_std": STORED, "ema.snapshot_every_kimg": every * kimg,
        "train.sample_every_kimg": 0.0, **overrides})  # fmt: skip


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


RUN = snapshot_config(12, 3, **{"train.ckpt_every_kimg": 3 * 8 / 1000})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 12-step toy run with snapshots (and checkpoints) at steps 3, 6, 9 and 12."""
    workdir = tmp_path_factory.mktemp("phema") / "run"
    train(RUN, workdir, log=quiet)
    return workdir


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_training_writes_snapshots_of_the_power_emas(run):
    from scm_jax.run.checkpoint import Checkpointer

    assert snap_lib.snapshot_steps(run) == [3, 6, 9, 12]
    s = snap_lib.read_snapshot(snap_lib.snapshot_path(run, 12))
    assert (s.step, s.nimg, s.batch_size) == (12, 96, 8)
    assert s.emas == {"power_0.050": 0.05, "power_0.100": 0.1}
    assert not list((run / "ema_snapshots").glob(".*"))  # no temporary files left
    tensors = read_tensors(s.path)
    ckpt = Checkpointer(run, read_only=True)
    try:
        import orbax.checkpoint as ocp

        emas = ckpt.manager.restore(12, args=ocp.args.Composite(emas=ocp.args.StandardRestore()))
    finally:
        ckpt.close()
    from scm_jax.run.state_dict import to_state_dict

    for name in s.emas:  # the snapshot is the checkpoint's EMA, bit for bit
        for k, v in to_state_dict(emas["emas"][name]).items():
            np.testing.assert_array_equal(tensors[f"{name}/{k}"], v)


def test_phema_cli_end_to_end(run, tmp_path, capsys):
    """Reconstruct 0.10 at a snapshot's step (gives the snapshot back), and 0.05 / 0.07 at the
    end; the folders sample, export, and load as init_from and as a teacher."""
    import scm_jax
    from scm_jax.run.emas import load_ema_params

    code, out, err = run_cli(capsys, "phema", "--workdir", run, "--sigma-rel", "0.1",
                             "--at-step", "6", "--out", tmp_path / "at6")  # fmt: skip
    assert code == 0, err
    assert "reconstructing at step 6" in out and "sigma_rel 0.100: profile error 0.00%" in out
    folder = tmp_path / "at6" / "phema_0.100"
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["ema"], cfg["step"], cfg["format"]) == ("phema_0.100", 6, "scm-jax-export")
    coef = {(c["step"], c["ema"]): c["coefficient"] for c in cfg["phema"]["snapshots"]}
    assert coef[(6, "power_0.100")] == pytest.approx(1.0, abs=1e-6)
    assert sum(abs(v) for v in coef.values()) == pytest.approx(1.0, abs=1e-5)
    want = read_tensors(snap_lib.snapshot_path(run, 6))
    for k, v in read_tensors(folder / "model.safetensors").items():
        np.testing.assert_allclose(v, want[f"power_0.100/{k}"], rtol=1e-5, atol=1e-7)

    code, out, err = run_cli(capsys, "phema", "--workdir", run, "--sigma-rel", "0.05,0.07")
    assert code == 0, err
    dirs = [run / "phema" / n for n in ("phema_0.050", "phema_0.070")]
    assert all(json.loads((d / "config.json").read_text())["step"] == 12 for d in dirs)
    sampler = scm_jax.load_sampler(dirs[1])
    x = sampler.sample(0, 4, steps=2)
    assert x.shape == (4, 2) and np.all(np.isfinite(x))
    code, _, err = run_cli(capsys, "sample", "--workdir", dirs[1], "--num", "3", "--out",
                           tmp_path / "s.npz")  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", "--workdir", dirs[0], "--to", "safetensors",
                           "--out", tmp_path / "exported")  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["ema"] == "phema_0.050"
    # What init_from and an sCD teacher (teacher.ema_std) load.
    model = json.loads((run / "config.json").read_text())["model"]
    _, _, name = load_ema_params(dirs[0], model, None, what="init_from run")
    assert name == "phema_0.050"
    _, _, name = load_ema_params(dirs[1], model, None, sigma_rel=0.07, what="teacher")
    assert name == "phema_0.070"
    with pytest.raises(ValueError, match=r"is an export of EMA phema_0\.070, not phema_0\.100"):
        load_ema_params(dirs[1], model, None, sigma_rel=0.1, what="teacher")
    # Run again: the earlier reconstruction is replaced, nothing else is left behind.
    code, _, err = run_cli(capsys, "phema", "--workdir", run, "--sigma-rel", "0.05", "--at-kimg",
                           "0.072")  # fmt: skip
    assert code == 0, err
    assert json.loads((dirs[0] / "config.json").read_text())["step"] == 9
    assert sorted(p.name for p in (run / "phema").iterdir()) == ["phema_0.050", "phema_0.070"]


def test_phema_errors_are_one_line_and_write_nothing(run, tmp_path, capsys):
    none = tmp_path / "none"
    nosnap, one, damaged = (tmp_path / n for n in ("nosnap", "one", "damaged"))
    for d in (nosnap, one, damaged):
        shutil.copytree(run, d, ignore=shutil.ignore_patterns("checkpoints", "phema"))
    shutil.rmtree(nosnap / "ema_snapshots")
    for s in (3, 6, 9):
        snap_lib.snapshot_path(one, s).unlink()
    snap_lib.snapshot_path(damaged, 6).write_bytes(b"\x00garbage")
    busy = tmp_path / "busy" / "phema_0.050"
    busy.mkdir(parents=True)
    (busy / "notes.txt").write_text("mine")
    cases = [
        ([none, "0.05"], "is not a training run's folder"),
        ([nosnap, "0.05"], "has no EMA snapshots"),
        ([nosnap, "0.05"], "--config.ema.snapshot_every_kimg=K"),
        ([one, "0.05"], "has 1 EMA snapshot (step 12); the least-squares reconstruction needs"),
        ([run, "0.3"], "--sigma-rel 0.3: sigma_rel must be in (0, 0.2887)"),
        ([run, "0.05,x"], "expected numbers like 0.05,0.1"),
        ([run, "0.05", "--at-step", "13"], "--at-step 13: must lie between step 1 and the last"),
        ([run, "0.05", "--at-kimg", "0"], "--at-kimg 0 (step 0): must lie between"),
        ([damaged, "0.05"], "0000000006.safetensors' is damaged"),
        ([run, "0.05", "--out", tmp_path / "busy"], "is a folder with other files"),
    ]  # fmt: skip
    for (workdir, sigma, *rest), message in cases:
        code, _, err = run_cli(capsys, "phema", "--workdir", workdir, "--sigma-rel", sigma, *rest)
        assert code == 2 and err.startswith("scm-jax phema: error:"), err
        assert message in err and len(err.splitlines()) == 1, err
    for d in (nosnap, one, damaged):
        assert not (d / "phema").exists()
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    assert not list((tmp_path / "busy").glob(".*"))
    with pytest.raises(ValueError, match=r"ema\.power_std is empty"):  # checked before training
        train(smoke_config("toy_gmm:smoke", **{"ema.snapshot_every_kimg": 1.0}), tmp_path / "x",
              log=quiet)  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_resume_neither_duplicates_nor_loses_snapshots(run, tmp_path):
    """SIGTERM at step 4 and resume: the stop's snapshot is kept, the rest are those of the
    straight run (bit-identical). A run killed past its last checkpoint: its later snapshots
    (here a damaged one and one off the interval) are deleted and written again."""

    def stop_at_4(line: str) -> None:
        if line.startswith("step 4/"):
            os.kill(os.getpid(), signal.SIGTERM)

    resumed = tmp_path / "resumed"
    assert train(RUN, resumed, log=stop_at_4)["interrupted"] == signal.SIGTERM
    assert snap_lib.snapshot_steps(resumed) == [3, 4]
    train(RUN, resumed, log=quiet)
    assert snap_lib.snapshot_steps(resumed) == [3, 4, 6, 9, 12]

    def same(step: int) -> bool:
        ta = read_tensors(snap_lib.snapshot_path(run, step))
        tb = read_tensors(snap_lib.snapshot_path(resumed, step))
        return ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)

    assert all(same(s) for s in (3, 6, 9, 12))
    # As if killed after writing snapshots 10 and 12 but before checkpoint 12.
    shutil.rmtree(resumed / "checkpoints" / "12")
    snap_lib.snapshot_path(resumed, 12).write_bytes(b"\x00torn")
    shutil.copy(snap_lib.snapshot_path(resumed, 9), snap_lib.snapshot_path(resumed, 10))
    (resumed / "ema_snapshots" / ".0000000013.safetensors.tmp").write_bytes(b"\x00")
    lines: list[str] = []
    train(RUN, resumed, log=lines.append)
    assert any("deleted 2 EMA snapshot(s) after step 9 (steps 10..12" in ln for ln in lines), lines
    assert snap_lib.snapshot_steps(resumed) == [3, 4, 6, 9, 12]
    assert same(12)
    assert not list((resumed / "ema_snapshots").glob(".*"))


def test_snapshot_interval_may_change_on_resume(tmp_path):
    """ema.snapshot_every_kimg is not part of a run's identity: a run written before the field
    existed (or without snapshots) resumes with them on."""
    from scm_jax.run.layout import config_to_dict, prepare_workdir, run_identity

    old = config_to_dict(RUN)
    del old["ema"]["snapshot_every_kimg"]
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(old))
    changes = prepare_workdir(tmp_path, RUN, has_checkpoint=True, check_only=True)
    assert changes == ["ema.snapshot_every_kimg: None -> 0.024"]
    assert "ema.snapshot_every_kimg" not in run_identity(RUN)
