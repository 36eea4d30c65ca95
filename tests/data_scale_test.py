"""The data at TrigFlow's scale (issue 21): stated statistics, `scm-jax data-stats`, the
per-channel normalisation and its inverse on every path samples leave by (the Sampler, the
StableHLO and PyTorch samplers), the start-up warning, teachers of another scale, and durations
(tangent warm-up, DMD start, EMA half-life) in steps, kimg or a fraction of the run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import cli, sampling
from scm_jax.config import defaults
from scm_jax.config import durations as config_durations
from scm_jax.config.validate import problems
from scm_jax.data.arrays import ArrayDataset
from scm_jax.data.scale import DataScale, channel_stats, data_scale
from scm_jax.data.sources import load_dataset
from scm_jax.networks import build_network
from scm_jax.run.exports import export_config
from scm_jax.run.sampler import Sampler
from scm_jax.train.loop import check_data_std
from scm_jax.train.teacher import check_same_scale

MNIST_MEAN, MNIST_STD = -0.7374, 0.6171  # `scm-jax data-stats --config mnist`


def test_encode_decode_round_trip_per_channel():
    scale = DataScale((0.1, -0.2, 0.3), (0.4, 0.5, 0.6), sigma_d=0.5)
    x = np.random.default_rng(0).normal(size=(4, 5, 5, 3)).astype(np.float32)
    enc = scale.encode(x)
    np.testing.assert_allclose(enc[..., 1], (x[..., 1] + 0.2) * 0.5 / 0.5, rtol=1e-6)
    np.testing.assert_allclose(enc[..., 2], (x[..., 2] - 0.3) * 0.5 / 0.6, rtol=1e-6)
    np.testing.assert_allclose(scale.decode(enc), x, atol=1e-6)
    back = jax.jit(scale.decode)(jnp.asarray(enc))  # the same on the device, same dtype
    assert back.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(back), x, atol=1e-6)
    assert DataScale(sigma_d=0.5).identity and DataScale(sigma_d=0.5).decode(x) is x
    with pytest.raises(ValueError, match=r"data with 4 channels .* the data scale has 3"):
        scale.encode(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="std must be > 0"):
        DataScale((0.0,), (0.0,))


def test_mnist_is_normalised_and_data_stats_measures_it(capsys):
    cfg = defaults.load_config("mnist")
    assert cfg.dataset.normalize == "per_channel"
    assert cfg.dataset.mean == (MNIST_MEAN,) and cfg.dataset.std == (MNIST_STD,)
    raw = load_dataset(cfg.dataset, sigma_d=0.5, data_units=True)
    model = load_dataset(cfg.dataset, sigma_d=0.5)
    idx = np.arange(5000)
    x_raw, x_model = raw.take(idx)[0], model.take(idx)[0]
    assert abs(x_model.mean()) < 1e-3 and abs(x_model.std() - 0.5) < 1e-3
    np.testing.assert_allclose(data_scale(cfg.dataset, 0.5).decode(x_model), x_raw, atol=1e-5)
    stats = channel_stats(raw, chunk=777)  # chunked float64 sums = numpy over everything
    assert stats["num"] == 5000
    assert stats["mean"][0] == pytest.approx(float(x_raw.mean()), abs=1e-6)
    assert stats["std"][0] == pytest.approx(float(x_raw.std()), abs=1e-6)
    assert stats["rms_all"] == pytest.approx(float(np.sqrt((x_raw.astype(np.float64) ** 2).mean())))
    assert cli.main(["data-stats", "--config", "mnist", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mean"][0] == pytest.approx(MNIST_MEAN, abs=1e-4)
    assert out["std"][0] == pytest.approx(MNIST_STD, abs=1e-4)
    assert out["model_std"] == pytest.approx(0.5, abs=1e-3)
    assert cli.main(["data-stats", "--config", "mnist", "--config.dataset.normalize=none"]) == 0
    text = capsys.readouterr().out
    assert "mean (-0.7374)  std (0.6171)" in text and "RMS 0.9615" in text
    assert "--config.dataset.normalize=per_channel" in text


def test_per_channel_statistics_of_colour_images():
    rng = np.random.default_rng(1)
    x = np.clip(rng.normal([100, 150, 200], [20, 30, 40], (64, 4, 4, 3)), 0, 255).astype(np.uint8)
    stats = channel_stats(ArrayDataset(x), chunk=10)
    want = x.astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(stats["mean"], want.mean((0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(stats["std"], want.std((0, 1, 2)), atol=1e-6)


def test_validation_of_the_statistics():
    cfg = defaults.load_config("mnist").to_dict()
    assert problems(cfg, check_paths=False) == []
    cfg["dataset"]["std"] = (0.5, 0.5)
    assert any("dataset.std has 2 values but the data has 1 channels" in p
               for p in problems(cfg, check_paths=False))  # fmt: skip
    cfg["dataset"]["mean"] = cfg["dataset"]["std"] = ()
    assert any("needs dataset.mean and dataset.std" in p and "scm-jax data-stats" in p
               for p in problems(cfg, check_paths=False))  # fmt: skip
    cfg["dataset"]["normalize"] = "sometimes"
    assert any(p.startswith("dataset.normalize") for p in problems(cfg, check_paths=False))
    latents = defaults.load_config("imagenet512").to_dict()
    latents["dataset"]["normalize"] = "per_channel"
    assert any("latents are already normalised" in p
               for p in problems(latents, check_paths=False))  # fmt: skip


def _tiny_sampler(scale: DataScale | None, objective: str = "sct") -> Sampler:
    cfg = defaults.load_config(f"mnist:smoke,objective={objective}")
    nd = build_network(cfg.model)
    params = nd.init(jax.random.key(0))["net"]
    return Sampler(nd, params, sigma_d=0.5, objective=objective, scale=scale)


@pytest.mark.parametrize("objective", ["sct", "diffusion"])
def test_sampler_returns_data_units(objective):
    """sample / sample_batch invert the scale exactly once; network and consistency stay in
    model units."""
    scale = DataScale((MNIST_MEAN,), (MNIST_STD,), 0.5)
    plain, scaled = _tiny_sampler(None, objective), _tiny_sampler(scale, objective)
    key, steps = jax.random.key(0), 2
    a = np.asarray(plain.sample_batch(key, 4, steps))
    b = np.asarray(scaled.sample_batch(key, 4, steps))
    np.testing.assert_allclose(b, a * MNIST_STD / 0.5 + MNIST_MEAN, atol=1e-5)
    clipped = scaled.sample(0, 4, steps=steps)
    assert clipped.min() >= -1 and clipped.max() <= 1
    x_t, t = np.ones((2, 28, 28, 1), np.float32), np.array([0.5, 1.0], np.float32)
    assert np.array_equal(plain.consistency(x_t, t), scaled.consistency(x_t, t))


def test_stablehlo_and_torch_samplers_decode_like_the_sampler():
    from scm_jax.export import stablehlo
    from scm_jax.run.state_dict import to_state_dict

    scale = DataScale((MNIST_MEAN,), (MNIST_STD,), 0.5)
    sampler = _tiny_sampler(scale)
    times = sampling.consistency_times(2, np.arctan(160.0), 1.1)
    fn = jax.jit(stablehlo.make_sampler_fn(sampler.nd, times, 0.5, scale))
    key = jax.random.key(3)
    noise = stablehlo.consistency_noise(key, (3, 28, 28, 1), 2)
    labels = np.arange(3, dtype=np.int32)
    got = np.asarray(fn(to_state_dict(sampler.params), noise, labels))
    np.testing.assert_allclose(got, np.asarray(sampler.sample_batch(key, 3, 2, labels)), atol=1e-5)
    run_cfg = defaults.load_config("mnist:smoke").to_dict()
    cfg = export_config(run_cfg, ema="halflife", step=1, source="test")
    assert cfg["data_scale"] == {"mean": [MNIST_MEAN], "std": [MNIST_STD], "sigma_d": 0.5}
    torch = pytest.importorskip("torch", reason="needs PyTorch (pip install 'scm-jax[torch]')")
    from scm_jax.torch.sampling import decode

    x = torch.ones((2, 1, 4, 4))
    assert torch.allclose(decode(x, cfg["data_scale"]), x * MNIST_STD / 0.5 + MNIST_MEAN)
    assert decode(x, {"mean": [], "std": [], "sigma_d": 0.5}) is x


def test_start_up_warns_about_data_off_scale():
    lines: list[str] = []
    raw = defaults.load_config("mnist:smoke,objective=diffusion")
    with raw.unlocked():
        raw.dataset.normalize = "none"
    check_data_std(load_dataset(raw.dataset, sigma_d=0.5), 0.5, lines.append)
    assert len(lines) == 1 and "RMS 0.962" in lines[0] and "normalize=per_channel" in lines[0]
    lines.clear()
    ok = defaults.load_config("mnist:smoke,objective=diffusion")
    check_data_std(load_dataset(ok.dataset, sigma_d=0.5), 0.5, lines.append)
    assert lines == []


def test_a_teacher_of_another_scale_is_refused():
    student = defaults.load_config("mnist:smoke,objective=scd").to_dict()
    teacher = defaults.load_config("mnist:smoke,objective=diffusion").to_dict()
    check_same_scale(student, teacher, what="teacher", where="T")  # same scale: fine
    teacher["dataset"]["normalize"] = "none"
    with pytest.raises(ValueError, match=r"teacher in T was trained on data at another scale"):
        check_same_scale(student, teacher, what="teacher", where="T")


# ---------------------------------------------------------------------------------- durations


def _config(**loss):
    """MNIST sCD at size xs (800 steps of 16), the warm-up given by ``loss`` (others 0)."""
    cfg = defaults.load_config("mnist:objective=scd,size=xs")
    with cfg.unlocked():
        cfg.teacher.workdir = "T"
        cfg.loss.tangent_warmup_fraction = 0.0
        for k, v in loss.items():
            cfg.loss[k] = v
    return cfg


def test_warm_up_in_steps_kimg_or_fraction():
    total = config_durations.total_steps(_config())  # 800 steps of 16 (12.8 kimg)
    assert total == 800
    for fields, steps in [
        ({"tangent_warmup_kimg": 1.6}, 100),
        ({"tangent_warmup_fraction": 0.05}, 40),
        ({"tangent_warmup_steps": 120}, 120),
    ]:
        cfg = _config(**fields)
        assert problems(cfg, check_paths=False) == []
        resolved = config_durations.resolve_durations(cfg)
        assert resolved.loss.tangent_warmup_steps == steps
        assert resolved.loss.tangent_warmup_kimg == resolved.loss.tangent_warmup_fraction == 0
        assert config_durations.resolve_durations(resolved).to_dict() == resolved.to_dict()


def test_durations_are_refused_in_two_units_or_beyond_the_run():
    both = problems(_config(tangent_warmup_steps=10, tangent_warmup_kimg=1.0), check_paths=False)
    assert any("loss.tangent_warmup_steps and loss.tangent_warmup_kimg are both set" in p
               for p in both)  # fmt: skip
    long = problems(_config(tangent_warmup_steps=801), check_paths=False)
    assert any("tangent warm-up (801 steps" in p and "longer than the run (800 steps" in p
               for p in long)  # fmt: skip
    assert problems(_config(tangent_warmup_steps=800), check_paths=False) == []
    rcm = defaults.load_config("mnist:objective=rcm,size=xs").to_dict()
    rcm["teacher"]["workdir"] = "T"
    rcm["dmd"]["start_step"], rcm["dmd"]["start_fraction"] = 801, 0.0
    assert any("dmd start (801 steps) is after the end of the run (800 steps)" in p
               for p in problems(rcm, check_paths=False))  # fmt: skip
    ema = defaults.load_config("mnist").to_dict()
    ema["ema"]["halflife_fraction"] = 0.1
    assert any("ema.halflife_kimg and ema.halflife_fraction are both set" in p
               for p in problems(ema, check_paths=False))  # fmt: skip
    ema["ema"]["halflife_kimg"] = 0.0
    assert problems(ema, check_paths=False) == []
    resolved = config_durations.resolve_durations(defaults.load_config("mnist"))
    assert resolved.ema.halflife_kimg == 1.0  # no fraction set: kept
    cfg = defaults.load_config("mnist")
    with cfg.unlocked():
        cfg.ema.halflife_kimg, cfg.ema.halflife_fraction = 0.0, 0.1
    assert config_durations.resolve_durations(cfg).ema.halflife_kimg == pytest.approx(1.28)
