"""The consistency-error instrument (scm_jax.eval.consistency): exact on the mixture teacher,
the teacher as its own student, the cached reference, ``scm-jax eval --consistency`` and the
periodic measurement during training."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize, smoke_config, tiny_unet

from scm_jax import cli, gmm, sampling, trigflow
from scm_jax.config import defaults, validate
from scm_jax.eval import consistency as cons
from scm_jax.eval import consistency_run
from scm_jax.networks import build_network
from scm_jax.sharding import batch_sharding, make_mesh
from scm_jax.train.loop import train
from scm_jax.train.writers import read_metrics

SIGMA_D, T_MID = 0.5, 1.1
T_MAX = trigflow.t_max(80.0, SIGMA_D)
MIX = gmm.ring_mixture()
TEACHER = gmm.teacher_apply_fn(MIX, SIGMA_D)
TIMES = cons.default_times(SIGMA_D, 80.0, T_MID)
HEUN = 64


def exact_student(params, x_scaled, t, labels=None, guidance=None, key=None):
    """F of the exact consistency function f(x_t, t) = the exact flow map from t to 0."""
    del params, labels, guidance, key
    x_t = x_scaled * SIGMA_D
    f = gmm.flow_map(MIX, x_t, t, 0.0, SIGMA_D, num_steps=200)  # RK4: error ~1e-6
    tb = t[:, None]
    return (jnp.cos(tb) * x_t - f) / (SIGMA_D * jnp.sin(tb))


def shifted_student(params, x_scaled, t, labels=None, guidance=None, key=None):
    """A wrong student: the exact F + 0.5, so f is off by -0.5 sigma_d sin t everywhere."""
    return exact_student(params, x_scaled, t) + 0.5


@pytest.fixture(scope="module")
def pairs():
    return cons.make_pairs(np.asarray(MIX.sample(jax.random.key(1), 24)), None, 0, SIGMA_D)


@pytest.fixture(scope="module")
def ref(pairs):
    sharding = batch_sharding(make_mesh(-1, 1))
    return cons.reference(TEACHER, None, pairs, TIMES, t_mid=T_MID, sigma_d=SIGMA_D,
                          heun_steps=HEUN, batch=16, sharding=sharding)  # fmt: skip


def run(student, pairs, ref, params=None, teacher=TEACHER, t_params=None, **kw):
    return cons.evaluate(student, params, teacher, t_params, pairs, ref, TIMES, t_mid=T_MID,
                         sigma_d=SIGMA_D, heun_steps=HEUN, **kw)  # fmt: skip


def test_default_grid_holds_t_max_and_t_mid_and_checks_times():
    assert TIMES[-1] == pytest.approx(T_MAX) and T_MID in TIMES and len(TIMES) == 9
    assert list(TIMES) == sorted(TIMES) and TIMES[0] == pytest.approx(np.arctan(0.01 / 0.5), 1e-5)
    assert cons.check_times([0.5, 0.1, T_MAX], T_MAX, T_MID) == (0.1, 0.5, T_MID, T_MAX)
    with pytest.raises(ValueError, match="outside"):
        cons.check_times([1.6], T_MAX, T_MID)
    with pytest.raises(ValueError, match=r"closer than 0\.001"):
        cons.check_times([0.5, 0.5004], T_MAX, T_MID)


def test_solve_ode_from_t_max_is_the_ode_sampler():
    x = jnp.asarray(np.asarray(MIX.sample(jax.random.key(2), 8)) * 2.0)
    a, _ = sampling.sample_ode(TEACHER, None, x, (8, 2), 12, SIGMA_D)
    b = sampling.solve_ode_from(TEACHER, None, x, T_MAX, 12, SIGMA_D)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_exact_mixture_reference_and_student(pairs, ref):
    """The Heun reference is the exact flow map (to the solver's accuracy); the exact
    consistency function scores ~0 at every t, a wrong one what its offset predicts."""
    std = pairs.std
    for k, t in enumerate(TIMES):
        x_t = trigflow.add_noise(jnp.asarray(pairs.x0), jnp.asarray(pairs.z), t)
        exact = np.asarray(gmm.flow_map(MIX, x_t, t, 0.0, SIGMA_D, num_steps=400))
        assert np.sqrt(np.mean((ref["phi"][k] - exact) ** 2)) / std < 4e-3, t
    good = run(exact_student, pairs, ref, batch=16, sharding=batch_sharding(make_mesh(-1, 1)))
    assert max(good["errors"]) < 4e-3 and good["2step"] < 4e-3, good
    assert good["1step"] == good["errors"][-1]
    # the exact 2-step path is the teacher's own one: same distance from Phi(x_t_max)
    assert good["2step_vs_teacher"] == pytest.approx(good["ideal_2step_vs_teacher"], abs=5e-3)
    assert good["ideal_2step_vs_teacher"] > 0.5  # re-noising leaves z's trajectory
    bad = run(shifted_student, pairs, ref, batch=24)
    predicted = 0.5 * SIGMA_D * np.sin(np.asarray(TIMES)) / std
    np.testing.assert_allclose(bad["errors"], predicted, rtol=0.02, atol=4e-3)
    assert all(b > 5 * g for b, g in zip(bad["errors"], good["errors"], strict=True))
    assert bad["2step"] > 0.2


def test_sharded_padded_batches_equal_one_batch(pairs, ref):
    """24 pairs in batches of 16 over 8 devices (the last padded) = one unsharded batch."""
    a = run(shifted_student, pairs, ref, batch=16, sharding=batch_sharding(make_mesh(-1, 1)))
    b = run(shifted_student, pairs, ref, batch=24)
    np.testing.assert_allclose(a["errors"], b["errors"], rtol=1e-5)
    assert a["2step"] == pytest.approx(b["2step"], rel=1e-5)


def test_teacher_as_its_own_student_at_step_0():
    """A small network against itself: ~0 as t -> 0, growing with t; the 1-step and 2-step
    errors equal the DDIM one-step error computed independently (``sample_ode``)."""
    nd = build_network(defaults.load_config("toy_gmm:smoke").model)
    params = randomize(nd.init(jax.random.key(0))["net"], 0)
    x0 = np.asarray(MIX.sample(jax.random.key(3), 16))
    p = cons.make_pairs(x0, None, 1, SIGMA_D)
    ref = cons.reference(nd.apply_fn, params, p, TIMES, t_mid=T_MID, sigma_d=SIGMA_D,
                         heun_steps=HEUN)  # fmt: skip
    r = run(nd.apply_fn, p, ref, params=params, teacher=nd.apply_fn, t_params=params)
    err = np.asarray(r["errors"])
    assert err[0] < 2e-3 and err[-1] > 50 * err[0], err
    assert np.all(np.diff(err[:5]) > 0), err

    @jax.jit
    def ddim(x, t):  # f(x, t): one DDIM step to 0
        F = nd.apply_fn(params, x / SIGMA_D, jnp.full((16,), t))
        return trigflow.ddim_step(x, t, 0.0, F, SIGMA_D)

    def phi(x, t):  # the ODE sampler's Heun from sigma_max = sigma_d tan t
        return sampling.sample_ode(nd.apply_fn, params, x, (16, 2), HEUN, SIGMA_D,
                                   sigma_max=SIGMA_D * float(np.tan(t)))[0]  # fmt: skip

    def rms(a, b):
        return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2))) / p.std

    x_tmax = trigflow.add_noise(jnp.asarray(x0), jnp.asarray(p.z), T_MAX)
    x_hat = ddim(x_tmax, T_MAX)
    assert r["1step"] == pytest.approx(rms(x_hat, phi(x_tmax, T_MAX)), rel=1e-3)
    x_mid = trigflow.add_noise(x_hat, jnp.asarray(p.z_mid), T_MID)
    assert r["2step"] == pytest.approx(rms(ddim(x_mid, T_MID), phi(x_mid, T_MID)), rel=1e-3)
    assert r["2step_vs_teacher"] == pytest.approx(rms(ddim(x_mid, T_MID), phi(x_tmax, T_MAX)),
                                                  rel=1e-3)  # fmt: skip


def test_reference_is_cached_and_invalidated(pairs, tmp_path, monkeypatch):
    calls, lines = [], []
    real = cons.reference
    monkeypatch.setattr(consistency_run.cons, "reference",
                        lambda *a, **k: calls.append(k["heun_steps"]) or real(*a, **k))  # fmt: skip
    teacher = consistency_run.TeacherModel(TEACHER, None, "exact test mixture")
    path = tmp_path / consistency_run.REF_FILE

    def probe(heun_steps=4, teacher=teacher):
        return consistency_run.Probe(teacher, pairs, TIMES, t_mid=T_MID, sigma_d=SIGMA_D,
                                     heun_steps=heun_steps, batch=24, cache=path,
                                     log=lines.append)  # fmt: skip

    first = probe().reference
    mtime = path.stat().st_mtime_ns
    again = probe()
    np.testing.assert_array_equal(again.reference["phi"], first["phi"])
    assert calls == [4] and path.stat().st_mtime_ns == mtime and again.reference_source == "cached"
    assert probe(heun_steps=5).reference is not None
    assert calls == [4, 5] and "was computed for another heun_steps; recomputing" in lines[-3]
    assert probe(5, consistency_run.TeacherModel(TEACHER, None, "other")).reference is not None
    assert calls == [4, 5, 5] and "another teacher; recomputing" in lines[-3]
    path.write_bytes(b"garbage")
    assert probe(5).reference is not None
    assert calls == [4, 5, 5, 5] and "is unreadable" in lines[-3]
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary files were renamed


def test_config_checks():
    def found(spec, **evals):
        cfg = defaults.load_config(spec)
        with cfg.unlocked():
            cfg.evals.update({"consistency_every_kimg": 1.0, **evals})
        return validate.problems(cfg, check_paths=False)

    assert found("toy_gmm:smoke,objective=scd") == []
    assert found("toy_gmm:smoke", consistency_teacher="exact_gmm") == []
    assert "a diffusion run is the teacher itself" in found("toy_gmm:smoke,objective=diffusion")[0]
    assert "sCT has no teacher to compare with" in found("toy_gmm:smoke")[0]
    mnist = found("mnist:smoke", consistency_teacher="exact_gmm")
    assert "needs dataset.source='toy_gmm'" in mnist[0]
    assert "exceed t_max" in found("toy_gmm:smoke,objective=scd", consistency_times=(0.1, 1.57))[0]
    assert "must be >= 1" in found("toy_gmm:smoke,objective=scd", consistency_num=0)[0]


# --------------------------------------------------------- a tiny sCD run: periodic and CLI


@pytest.fixture(scope="module")
def scd_run(tmp_path_factory):
    """The toy sCD run (exact teacher), 2 steps, the consistency error at every step."""
    root = tmp_path_factory.mktemp("consistency_runs")
    cfg = smoke_config("toy_gmm:smoke,objective=scd", **{
        "evals.consistency_every_kimg": 0.008, "evals.consistency_num": 16,
        "evals.consistency_heun_steps": 8, "train.sample_every_kimg": 0.0})  # fmt: skip
    lines: list[str] = []
    out = train(cfg, root / "scd", log=lines.append)
    return {"root": root, "out": out, "lines": lines}


def test_periodic_consistency_is_logged_with_the_metrics(scd_run):
    workdir = scd_run["root"] / "scd"
    rows = [r for r in read_metrics(workdir) if "consistency/2step" in r]
    assert [r["step"] for r in rows] == [1, 2]  # every step (< total) and at the end
    names = {cons.time_label(t) for t in TIMES}
    names |= {"consistency/1step", "consistency/2step", "consistency/2step_vs_teacher"}
    assert all(set(r) == {"step", "time", "consistency_time_s", *names} for r in rows)
    assert all(0 < r["consistency/t=0.020"] < r["consistency/1step"] for r in rows)
    assert set(scd_run["out"]["consistency"]) == {1, 2}
    assert sum("teacher reference" in ln for ln in scd_run["lines"]) == 1  # computed once
    assert any(ln.startswith("consistency step 2: 1step") for ln in scd_run["lines"])
    saved = json.loads((workdir / "eval" / "consistency_step2.json").read_text())
    assert saved["errors"] == [rows[1][cons.time_label(t)] for t in TIMES]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_eval_consistency_cli(scd_run, tmp_path, capsys):
    workdir = scd_run["root"] / "scd"
    code, out, err = run_cli(capsys, "eval", "--workdir", workdir, "--consistency", "--num", 16,
                             "--heun-steps", 8, "--json-out", tmp_path / "c.json")  # fmt: skip
    assert code == 0, err
    assert "reference cached" in out  # the training run's reference: same pairs, grid, teacher
    rows = [ln.split() for ln in out.splitlines() if ln[:7].strip().replace(".", "").isdigit()]
    assert [float(r[0]) for r in rows] == pytest.approx(TIMES, abs=1e-3)
    assert float(rows[-1][1]) == pytest.approx(80.0, rel=1e-3)  # sigma = sigma_d tan t
    result = json.loads((tmp_path / "c.json").read_text())
    assert result == json.loads((workdir / "eval" / "consistency_step2.json").read_text())
    assert result["teacher"].startswith("exact_gmm") and result["num"] == 16
    periodic = scd_run["out"]["consistency"][2]
    assert result["errors"] == pytest.approx([periodic[cons.time_label(t)] for t in TIMES])


def test_eval_consistency_bad_inputs_and_own_student(scd_run, capsys):
    root = scd_run["root"]
    for name, objective in (("sct", "sct"), ("diffusion", "diffusion")):
        shutil.copytree(root / "scd", root / name, dirs_exist_ok=True)
        cfg = json.loads((root / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**cfg, "objective": objective}))
    w = ["eval", "--workdir", root / "scd", "--consistency"]
    cases = [
        ([*w, "--ref", "x.npz"], "--consistency measures no FID: drop --ref"),
        ([*w, "--times", "2.0"], "consistency time 2.0 is outside (0, t_max = 1.56455]"),
        ([*w, "--num", "5000"], "5000 consistency pairs, but the run's data holds 1000"),
        ([*w, "--teacher", root / "none"], "is not a training run's folder"),
        ([*w, "--teacher", root / "sct"], "is a sct run; the consistency error compares"),
        ([*w, "--guidance", "2"], "this model has no guidance input"),
        ([*w, "--heun-steps", "0"], "must be >= 1"),
        (["eval", "--workdir", root / "sct", "--consistency"], "names no teacher to compare"),
        (["eval", "--workdir", root / "scd"], "FID needs --ref"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    # a diffusion run is its own student (its denoiser against its own PF-ODE): ~0 as t -> 0
    code, _, err = run_cli(capsys, "eval", "--workdir", root / "diffusion", "--consistency",
                             "--num", 8, "--heun-steps", 4)  # fmt: skip
    assert code == 0, err
    result = json.loads((root / "diffusion" / "eval" / "consistency_step2.json").read_text())
    assert "EMA halflife step 2" in result["teacher"] and result["errors"][0] < 1e-2


def test_images_with_labels_guidance_and_cfg_sharded():
    """A class-conditional U-Net student with a guidance input against a CFG U-Net teacher:
    image batches, labels and guidance flow through (8 devices, the batch padded)."""
    nd = tiny_unet(channel_mult=(1,), attn_resolutions=())
    params = nd.init(jax.random.key(0))["net"]
    teacher = tiny_unet(channel_mult=(1,), attn_resolutions=(), guidance_input=False)
    t_params = teacher.init(jax.random.key(2))["net"]
    x0 = np.asarray(jax.random.uniform(jax.random.key(1), (12, 8, 8, 3), minval=-1, maxval=1))
    p = cons.make_pairs(x0, np.arange(12) % 5, 0, SIGMA_D)
    times = cons.check_times([0.5], T_MAX, T_MID)
    kw = dict(t_mid=T_MID, sigma_d=SIGMA_D, heun_steps=2, cfg_scale=1.5)
    sharded = dict(sharding=batch_sharding(make_mesh(-1, 1)))  # 12 pairs: 16 rows, 4 padded
    ref = cons.reference(teacher.apply_fn, t_params, p, times, **kw, **sharded)
    assert ref["phi"].shape == (3, 12, 8, 8, 3) and ref["ideal_2step"].shape == (12, 8, 8, 3)
    r = cons.evaluate(nd.apply_fn, params, teacher.apply_fn, t_params, p, ref, times,
                      guidance=1.5, **kw, **sharded)  # fmt: skip
    assert np.all(np.isfinite(r["errors"])) and r["errors"][0] < r["errors"][-1]
    assert r["num"] == 12 and r["data_std"] == pytest.approx(float(np.std(x0)))
