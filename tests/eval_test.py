"""FID evaluation: sharded statistics of samples and data, `scm-jax fid-stats` / `scm-jax eval`,
periodic FID in the training loop, and the errors a user can cause.

The point of these tests is the plumbing, so a tiny random-projection feature function (16-d)
stands in for Inception (``features.load_extractor`` is monkeypatched); one slow test runs the real
converted weights when the TorchScript file and torch are there.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import quiet, smoke_config, tiny_unet
from jax.sharding import NamedSharding, PartitionSpec

from scm_jax import cli
from scm_jax.eval import features, fid, runner
from scm_jax.image_grids import to_uint8
from scm_jax.run.sampler import Sampler
from scm_jax.sharding import batch_sharding, make_mesh
from scm_jax.train.loop import train
from scm_jax.train.writers import read_metrics

DIM = 16
TORCHSCRIPT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "inception"
TORCHSCRIPT = TORCHSCRIPT / "inception_v3_fid_torchscript.pt"
CIFAR_TEST = TORCHSCRIPT.parents[1] / "cifar10_jpeg" / "test.tar.gz"


def tiny_features(params, x):
    """(B, H, W, 1|3) in the network's range -> (B, 16): a 4x4 resize and a random projection."""
    x = jnp.broadcast_to(x, (*x.shape[:3], 3))
    x = jax.image.resize(x, (x.shape[0], 4, 4, 3), "linear")
    return jnp.tanh(x.reshape(x.shape[0], -1) @ params["w"])


def tiny_extractor(dim: int = DIM) -> features.FeatureExtractor:
    w = np.random.default_rng(0).standard_normal((48, dim)).astype(np.float32) / 4
    info = {"variant": "tiny-test", "source_sha256": "0" * 64}
    return features.FeatureExtractor(tiny_features, {"w": jnp.asarray(w)}, dim, info)


@pytest.fixture
def tiny(monkeypatch) -> features.FeatureExtractor:
    """Every command gets the tiny extractor instead of Inception (weights path ignored)."""
    ext = tiny_extractor()
    monkeypatch.setattr(features, "load_extractor", lambda *a, **k: ext)
    monkeypatch.setattr(runner, "load_extractor", lambda *a, **k: ext)
    return ext


def reference_stats(ext, images_u8: np.ndarray):
    """Float64 statistics of the tiny features of uint8 images, computed without the pipeline."""
    x = features.to_network_range(jnp.asarray(images_u8), ext.convention)
    return fid.stats_from_features(np.asarray(ext.apply(ext.params, x), np.float64))


def one_device_mesh():
    return make_mesh(1, 1, devices=jax.devices()[:1])


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


# ------------------------------------------------------------------------- sharded pipeline


def test_sample_stats_sharded_over_8_devices_equal_unsharded():
    """Samples are generated batch-sharded on 8 devices; statistics match one device."""
    ext, nd = tiny_extractor(), tiny_unet(channel_mult=(1,), attn_resolutions=())
    params = nd.init(jax.random.key(0))["net"]
    mesh8 = make_mesh(-1, 1)
    assert mesh8.size == 8
    sampler = Sampler(nd, jax.device_put(params, NamedSharding(mesh8, PartitionSpec())),
                      sigma_d=0.5, objective="sct", guidance=1.5)  # fmt: skip
    x = sampler.sample_batch(jax.random.key(3), 16, steps=2, sharding=batch_sharding(mesh8))
    assert x.shape == (16, 8, 8, 3) and len(x.sharding.device_set) == 8
    assert {s.data.shape[0] for s in x.addressable_shards} == {2}
    lines: list[str] = []
    r8 = runner.sample_stats(sampler, 2, 37, features=ext, mesh=mesh8, batch_size=12,
                             log=lines.append)  # fmt: skip
    assert any("3 batch(es) of 16 on 8 device(s)" in ln for ln in lines)  # 12 -> 16 (8 devices)
    mesh1 = one_device_mesh()
    single = sampler.with_params(jax.device_put(params, jax.devices()[0]))
    r1 = runner.sample_stats(single, 2, 37, features=ext, mesh=mesh1, batch_size=16, log=quiet)
    assert r8.n == r1.n == 37 and r8.nfe == 2
    np.testing.assert_allclose(r8.mu, r1.mu, atol=1e-6)
    np.testing.assert_allclose(r8.sigma, r1.sigma, atol=1e-6)
    assert r8.sampling_seconds > 0 and r8.feature_seconds > 0 and r8.compile_seconds > 0
    # The same samples through numpy: quantised like saved PNGs, then the same features.
    keys = [jax.random.fold_in(jax.random.key(0), i) for i in range(3)]
    y = [((np.arange(16) + 16 * i) % 5).astype(np.int32) for i in range(3)]
    xs = np.concatenate([np.asarray(single.sample_batch(k, 16, 2, yi)) for k, yi in zip(keys, y,
                         strict=True)])[:37]  # fmt: skip
    mu, sigma = reference_stats(ext, to_uint8(xs))
    np.testing.assert_allclose(r1.mu, mu, atol=1e-5)
    np.testing.assert_allclose(r1.sigma, sigma, atol=1e-5)


def test_dataset_stats_sharded_equal_float64_reference():
    from scm_jax.data.arrays import ArrayDataset

    ext = tiny_extractor()
    u8 = np.random.default_rng(1).integers(0, 256, (45, 9, 9, 1), dtype=np.uint8)
    lines: list[str] = []
    mu, sigma, n, _ = features.dataset_stats(ArrayDataset(u8), 45, features=ext, mesh=make_mesh(),
                                           batch_size=16, log=lines.append)  # fmt: skip
    ref_mu, ref_sigma = reference_stats(ext, u8)
    assert n == 45
    np.testing.assert_allclose(mu, ref_mu, atol=1e-6)
    np.testing.assert_allclose(sigma, ref_sigma, atol=1e-6)
    assert "45/45 images (100%)" in lines[-1]
    with pytest.raises(ValueError, match="holds only 45"):
        features.dataset_stats(ArrayDataset(u8), 46, features=ext, log=quiet)
    with pytest.raises(ValueError, match="FID needs images"):
        features.dataset_stats(ArrayDataset(np.zeros((4, 2), np.float32)), 4, features=ext)


# ------------------------------------------------------------------------------ fid-stats


def write_npz(path: Path, seed: int, n: int = 40, shift: int = 0) -> Path:
    x = np.random.default_rng(seed).integers(0, 200, (n, 8, 8, 3)) + shift
    np.savez(path, x=x.astype(np.uint8))
    return path


def test_fid_stats_cli_writes_stats_and_prints_fid(tiny, tmp_path, capsys):
    a, b = write_npz(tmp_path / "a.npz", 0), write_npz(tmp_path / "b.npz", 1, shift=50)
    code, out, err = run_cli(capsys, "fid-stats", "--data", a, "--out", tmp_path / "sa.npz",
                             "--batch", "16")  # fmt: skip
    assert code == 0, err
    mu, sigma, n, meta = fid.load_stats(tmp_path / "sa.npz")
    with np.load(a) as f:
        ref_mu, ref_sigma = reference_stats(tiny, f["x"])
    np.testing.assert_allclose(mu, ref_mu, atol=1e-6)
    np.testing.assert_allclose(sigma, ref_sigma, atol=1e-6)
    assert n == 40 and meta["input_convention"] == "tf" and meta["resize"] == "tf1-bilinear"
    assert meta["weights_variant"] == "tiny-test" and "first 40 images" in meta["source"]
    code, out, err = run_cli(capsys, "fid-stats", "--data", b, "--out", tmp_path / "sb.npz",
                             "--num", "30", "--ref", tmp_path / "sa.npz")  # fmt: skip
    assert code == 0, err
    expected = fid.frechet_distance(mu, sigma, *fid.load_stats(tmp_path / "sb.npz")[:2])
    line = next(ln for ln in out.splitlines() if ln.startswith("FID against"))
    assert float(line.split()[-1]) == pytest.approx(expected, rel=1e-4) and expected > 0.1
    assert fid.load_stats(tmp_path / "sb.npz")[2] == 30


def test_fid_stats_reads_archives_folders_and_mnist(tiny, tmp_path, capsys):
    from PIL import Image

    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        arr = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    archive, out_npz = tmp_path / "test.tar.gz", tmp_path / "x.npz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(6):
            data = png(i)
            info = tarfile.TarInfo(f"test/{'ab'[i % 2]}/{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    code, out, err = run_cli(capsys, "fid-stats", "--data", archive, "--out", tmp_path / "t.npz")
    assert code == 0, err
    assert "6 images of (8, 8, 3)" in out and "(split test)" in out
    for split in ("train", "test"):
        for i in range(3):
            d = tmp_path / "folder" / split / "c"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i}.png").write_bytes(png(i))
    code, _, err = run_cli(capsys, "fid-stats", "--data", tmp_path / "folder", "--out",
                           tmp_path / "f.npz")  # fmt: skip
    assert code == 2 and "holds the splits ['test', 'train']: choose one with --split" in err
    code, _, err = run_cli(capsys, "fid-stats", "--data", tmp_path / "folder", "--split", "train",
                           "--out", tmp_path / "f.npz")  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(capsys, "fid-stats", "--data", "mnist5k", "--num", "10", "--out",
                             tmp_path / "m.npz")  # fmt: skip
    assert code == 0 and "10 images of (28, 28, 1)" in out, err
    assert "10 images for 16-d features: the covariance is singular" in out
    code, _, err = run_cli(capsys, "fid-stats", "--data", "tfds:cifar10", "--out", out_npz)
    assert code == 2 and "--shape" in err


def test_fid_stats_bad_input_errors(tmp_path, capsys, monkeypatch):
    npz = write_npz(tmp_path / "a.npz", 0)
    out = tmp_path / "s.npz"
    not_weights = tmp_path / "weights.npz"
    not_weights.write_text("not a zip")
    missing = tmp_path / "nowhere" / "inception_fid.npz"
    cases = [
        (["--inception", not_weights], "is not an .npz (zip) file; create it with `scm-jax "
         "fid-weights"),
        (["--inception", missing], f"no FID Inception weights at {missing} (--inception); "
         "create them once with `scm-jax fid-weights"),
    ]  # fmt: skip
    monkeypatch.setenv(features.ENV_VAR, str(missing))
    cases.append(([], f"({'$' + features.ENV_VAR})"))
    for extra, message in cases:
        code, _, err = run_cli(capsys, "fid-stats", "--data", npz, "--out", out, *extra)
        assert code == 2 and err.startswith("scm-jax fid-stats: error:"), err
        assert message in err and len(err.splitlines()) == 1, err
    ext = tiny_extractor()
    monkeypatch.setattr(features, "load_extractor", lambda *a, **k: ext)
    monkeypatch.setattr(runner, "load_extractor", lambda *a, **k: ext)
    other = tmp_path / "other.npz"
    fid.save_stats(other, np.zeros(8), np.eye(8), 100, {"resize": "tf1-bilinear"})
    cases = [
        (["--ref", other], f"reference statistics {other} are of 8-d features but the feature "
         "extractor gives 16-d"),
        (["--num", "41"], "--num 41 but"),
        (["--num", "1"], "at least 2 images"),
        (["--data", tmp_path / "missing"], "no such file or folder"),
        (["--data", "tfds:"], "expected tfds:NAME[:SPLIT]"),
    ]  # fmt: skip
    for extra, message in cases:
        args = [*extra, "--out", out] if extra[0] == "--data" else ["--data", npz, "--out", out,
                                                                    *extra]  # fmt: skip
        code, _, err = run_cli(capsys, "fid-stats", *args)
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# ------------------------------------------------------------ training runs, eval, periodic

# Smaller than mnist:smoke (one resolution, no attention: half the compile time) and small grids.
TINY_RUN = {"train.sample_grid": 4, "train.teacher_sample_steps": 2, "model.channel_mult": (1,),
            "model.attn_resolutions": (), "model.channels_per_head": 8}  # fmt: skip


def evals_overrides(ref: Path) -> dict:
    """Periodic FID at every step of a 2-step tiny run, 20 samples in batches of 16."""
    return {"evals.ref": str(ref), "evals.num": 20, "evals.batch_size": 16,
            "evals.teacher_nfe": 3, "evals.every_kimg": 0.008, **TINY_RUN}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step MNIST sCT run with periodic FID (tiny features), and a stand-in "teacher": a copy
    of it whose config says diffusion (same network and checkpoint; sampled with Heun)."""
    import shutil

    from scm_jax.data.sources import load_mnist_5k

    root = tmp_path_factory.mktemp("eval_runs")
    ext, ref = tiny_extractor(), root / "ref.npz"
    mu, sigma = reference_stats(ext, load_mnist_5k()[0][:64])
    fid.save_stats(ref, mu, sigma, 64, ext.meta("mnist first 64"))
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "load_extractor", lambda *a, **k: ext)
        out = train(smoke_config("mnist:smoke", **evals_overrides(ref)), root / "sct",
                    log=lines.append)  # fmt: skip
    shutil.copytree(root / "sct", root / "diffusion")
    cfg = json.loads((root / "diffusion" / "config.json").read_text())
    (root / "diffusion" / "config.json").write_text(json.dumps({**cfg, "objective": "diffusion"}))
    return {"root": root, "ref": ref, "sct": out, "lines": lines}


def test_periodic_fid_is_logged_with_the_metrics(runs):
    root = runs["root"]
    rows = [r for r in read_metrics(root / "sct") if any(k.startswith("fid/") for k in r)]
    assert [r["step"] for r in rows] == [1, 2]  # every step (< total) and at the end
    assert all(set(r) == {"step", "time", "fid/1step", "fid/2step", "eval_time_s"} for r in rows)
    assert all(r["fid/1step"] > 0 and r["fid/2step"] > 0 for r in rows)
    assert set(runs["sct"]["evals"]) == {1, 2}
    assert any(ln.startswith("eval step 2: fid/1step") for ln in runs["lines"])
    assert any("periodic FID every 0.008 kimg: 1step, 2step" in ln for ln in runs["lines"])
    saved = json.loads((root / "sct" / "eval" / "eval_step2.json").read_text())
    assert [r["setting"] for r in saved["results"]] == ["1step", "2step"]
    assert [r["step"] for r in read_metrics(root / "sct") if "loss" in r] == [1, 2]


def test_periodic_fid_is_checked_before_training(tmp_path):
    cfg = smoke_config("mnist:smoke", **{"evals.every_kimg": 1.0})
    with pytest.raises(ValueError, match=r"needs reference statistics: set --config\.evals\.ref"):
        train(cfg, tmp_path / "a", log=quiet)
    cfg = smoke_config("mnist:smoke", **{"evals.every_kimg": 1.0,
                                         "evals.ref": str(tmp_path / "none.npz")})  # fmt: skip
    with pytest.raises(ValueError, match="no FID statistics at"):  # scm_jax.config.validate
        train(cfg, tmp_path / "a", log=quiet)
    ref = tmp_path / "ref.npz"
    fid.save_stats(ref, np.zeros(4), np.eye(4), 10, {})
    cfg = smoke_config("mnist:smoke", **{"evals.every_kimg": 1.0, "evals.ref": str(ref),
                                         "evals.inception": str(tmp_path / "w.npz")})  # fmt: skip
    with pytest.raises(ValueError, match="scm-jax fid-weights"):
        train(cfg, tmp_path / "a", log=quiet)
    cfg = smoke_config("toy_gmm:smoke", **{"evals.every_kimg": 1.0, "evals.ref": str(ref)})
    with pytest.raises(ValueError, match="FID needs images"):
        train(cfg, tmp_path / "a", log=quiet)
    assert not (tmp_path / "a").exists()  # nothing written


def test_eval_cli_student_and_teacher(runs, tiny, tmp_path, capsys):
    root, ref = runs["root"], runs["ref"]
    code, out, err = run_cli(capsys, "eval", "--workdir", root / "sct", "--ref", ref, "--num",
                             "20", "--teacher-nfe", "3", "--teacher", root / "diffusion",
                             "--batch", "16", "--json-out", tmp_path / "e.json")  # fmt: skip
    assert code == 0, err
    result = json.loads((root / "sct" / "eval" / "eval_step2.json").read_text())
    assert result == json.loads((tmp_path / "e.json").read_text())
    rows = {r["setting"]: r for r in result["results"]}
    assert list(rows) == ["1step", "2step", "teacher_heun2"]
    assert [r["nfe"] for r in rows.values()] == [1, 2, 3]
    assert all(r["fid"] > 0 and r["sampling_seconds"] > 0 and r["num"] == 20 for r in rows.values())
    assert result["devices"] == 8 and result["batch_size"] == 16 and result["step"] == 2
    assert "images/s" in out and "teacher_heun2" in out
    # The same seed and batches give the samples of the periodic evaluation at the end of training.
    assert rows["1step"]["fid"] == pytest.approx(runs["sct"]["evals"][2]["fid/1step"], rel=1e-4)
    # A diffusion run is evaluated with its own EMA and Heun.
    code, out, err = run_cli(capsys, "eval", "--workdir", root / "diffusion", "--ref", ref,
                             "--num", "20", "--teacher-nfe", "3", "--batch", "16")  # fmt: skip
    assert code == 0, err
    result = json.loads((root / "diffusion" / "eval" / "eval_step2.json").read_text())
    assert [(r["setting"], r["nfe"]) for r in result["results"]] == [("heun2", 3)]
    assert result["results"][0]["fid"] == pytest.approx(rows["teacher_heun2"]["fid"], rel=1e-4)


def test_eval_accepts_export_folders(runs, tiny, tmp_path, capsys):
    """An export folder (``scm-jax export`` / ``phema``) is evaluated like its run, as student
    and as teacher: the same FID at its recorded step and EMA."""
    root, ref = runs["root"], runs["ref"]
    for name in ("sct", "diffusion"):
        code, _, err = run_cli(capsys, "export", "--workdir", root / name, "--to", "safetensors",
                               "--out", tmp_path / name)  # fmt: skip
        assert code == 0, err
    code, _, err = run_cli(capsys, "eval", "--workdir", tmp_path / "sct", "--ref", ref, "--num",
                             "20", "--teacher-nfe", "3", "--teacher", tmp_path / "diffusion",
                             "--batch", "16")  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "sct" / "eval" / "eval_step2.json").read_text())
    assert (result["step"], result["ema"]) == (2, "halflife")
    rows = {r["setting"]: r for r in result["results"]}
    assert list(rows) == ["1step", "2step", "teacher_heun2"]
    assert rows["1step"]["fid"] == pytest.approx(runs["sct"]["evals"][2]["fid/1step"], rel=1e-4)
    for args, message in [
        (["--ema", "power_0.050"], "is an export of EMA 'halflife'"),
        (["--teacher-nfe", "3"], "names no teacher: pass --teacher DIR"),
    ]:
        code, _, err = run_cli(capsys, "eval", "--workdir", tmp_path / "sct", "--ref", ref, *args)
        assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_eval_bad_input_errors(runs, tiny, tmp_path, capsys):
    root, ref = runs["root"], runs["ref"]
    other = tmp_path / "other.npz"
    fid.save_stats(other, np.zeros(8), np.eye(8), 100, {})
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "config.json").write_text((root / "sct" / "config.json").read_text())
    sct = ["--workdir", root / "sct"]
    cases = [
        ([*sct, "--ref", other], "are of 8-d features but the feature extractor gives 16-d"),
        (["--workdir", no_ckpt, "--ref", ref], "no checkpoints in"),
        (["--workdir", tmp_path, "--ref", ref], "is not a training run's folder"),
        ([*sct, "--ref", ref, "--guidance", "2"], "this model has no guidance input"),
        ([*sct, "--ref", ref, "--num", "1"], "at least 2 samples"),
        ([*sct, "--ref", ref, "--teacher-nfe", "4"], "the NFE must be odd"),
        ([*sct, "--ref", ref, "--teacher-nfe", "3"], "names no teacher: pass --teacher DIR"),
        ([*sct, "--ref", ref, "--steps", "1,x"], "expected integers"),
        (["--workdir", root / "diffusion", "--ref", ref], "is a diffusion run"),
        ([*sct, "--ref", tmp_path / "none.npz"], "no FID statistics"),
    ]  # fmt: skip
    for args, message in cases:
        code, _, err = run_cli(capsys, "eval", *args)
        assert code == 2 and err.startswith("scm-jax eval: error:"), (args, err)
        assert message in err and len(err.splitlines()) == 1, (args, err)
    assert not (no_ckpt / "eval").exists()


@pytest.mark.slow
def test_scd_student_and_its_teacher(tiny, tmp_path, capsys):
    """A real teacher and sCD student, both with periodic FID; the teacher is evaluated once."""
    ref = tmp_path / "ref.npz"
    u8 = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    fid.save_stats(ref, *reference_stats(tiny, u8), 40, tiny.meta("random digits"))
    teacher = train(smoke_config("mnist:smoke,objective=diffusion", **evals_overrides(ref)),
                    tmp_path / "teacher", log=quiet)  # fmt: skip
    assert [set(teacher["evals"][s]) for s in (1, 2)] == [{"fid/heun2", "eval_time_s"}] * 2
    student = train(smoke_config("mnist:smoke,objective=scd", **evals_overrides(ref),
                                 **{"teacher.workdir": str(tmp_path / "teacher")}),
                    tmp_path / "student", log=quiet)  # fmt: skip
    assert set(student["evals"][1]) == {"fid/1step", "fid/2step", "fid/teacher_heun2",
                                        "eval_time_s"}  # fmt: skip
    assert "fid/teacher_heun2" not in student["evals"][2]
    code, _, err = run_cli(capsys, "eval", "--workdir", tmp_path / "student", "--ref", ref,
                           "--num", "20", "--batch", "16", "--teacher-nfe", "3")  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "student" / "eval" / "eval_step2.json").read_text())
    teacher_row = result["results"][-1]
    assert teacher_row["setting"] == "teacher_heun2"
    assert str(tmp_path / "teacher") in teacher_row["model"]
    assert teacher_row["fid"] == pytest.approx(student["evals"][1]["fid/teacher_heun2"], rel=1e-4)


# ----------------------------------------------------------------------- real Inception


@pytest.mark.slow
def test_fid_stats_with_converted_weights(tmp_path, capsys, optimized):
    """The real converted Inception on 16 CIFAR-10 test images: CLI end to end, FID of a set
    against itself is 0."""
    pytest.importorskip("torch", reason="needs PyTorch to convert the TorchScript weights")
    if not TORCHSCRIPT.is_file() or not CIFAR_TEST.is_file():
        pytest.skip(f"needs {TORCHSCRIPT} and {CIFAR_TEST} (absent in this checkout)")
    assert cli.main(["fid-weights", "--from", str(TORCHSCRIPT), "--out", str(tmp_path)]) == 0
    stats = tmp_path / "c10.npz"
    code, out, err = run_cli(capsys, "fid-stats", "--data", CIFAR_TEST, "--num", "16", "--out",
                             stats, "--ref", tmp_path / "inception_fid.npz")  # fmt: skip
    assert code == 2 and "no 'mu' and 'sigma'" in err  # the weights are not statistics
    code, out, err = run_cli(capsys, "fid-stats", "--data", CIFAR_TEST, "--num", "16", "--out",
                             stats, "--inception", tmp_path, "--batch", "8")  # fmt: skip
    assert code == 0, err
    mu, _, n, meta = fid.load_stats(stats)
    assert mu.shape == (2048,) and n == 16 and meta["weights_variant"] == "torchscript-stylegan3"
    assert "singular" in out
    code, out, err = run_cli(capsys, "fid-stats", "--data", CIFAR_TEST, "--num", "16", "--out",
                             tmp_path / "c10b.npz", "--inception", tmp_path, "--batch", "8",
                             "--ref", stats)  # fmt: skip
    assert code == 0 and abs(float(out.split("FID against")[1].split(":")[1].split()[0])) < 1e-3
