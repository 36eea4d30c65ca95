"""`scm-jax export` of a real (tiny) trained run: the export folder, load_sampler on it, the
StableHLO round trip, teachers / init_from from an export, and the errors a user can cause."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import quiet, smoke_config
from safetensors.numpy import load_file

from scm_jax import cli, sampling
from scm_jax.data.scale import data_scale
from scm_jax.export import stablehlo
from scm_jax.run.emas import load_ema_params
from scm_jax.run.exports import load_export, tree_equal
from scm_jax.run.sampler import load_sampler
from scm_jax.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-step sCT run of the MNIST smoke config (checkpoint at step 2)."""
    workdir = tmp_path_factory.mktemp("runs") / "mnist"
    assert train(smoke_config("mnist:smoke"), workdir, log=quiet)["step"] == 2
    return workdir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "mnist"
    assert (
        cli.main(["export", "--workdir", str(run), "--to", "safetensors", "--out", str(out)]) == 0
    )
    return out


def test_export_folder(run, exported):
    """model.safetensors in PyTorch names and layouts + config.json; same weights as the run."""
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["format"] == "scm-jax-export" and cfg["ema"] == "halflife" and cfg["step"] == 2
    assert cfg["objective"] == "sct" and cfg["model"]["img_resolution"] == 28
    assert cfg["t_max"] == pytest.approx(np.arctan(80 / 0.5)) and cfg["t_mid"] == 1.1
    state = load_file(str(exported / "model.safetensors"))
    assert state["enc_28x28_conv.weight"].shape == (8, 2, 3, 3)  # OIHW: (C_out, C_in + 1, 3, 3)
    assert state["cond.emb_noise.weight"].shape == (16, 8)  # linear (out, in)
    assert state["out_gain"].shape == ()
    params, _, _ = load_ema_params(run, None, None)
    assert tree_equal(load_export(exported)[0], jax.tree.map(np.asarray, params))


def test_load_sampler_accepts_an_export(run, exported):
    """scm_jax.load_sampler(export) samples exactly like load_sampler(run)."""
    a = load_sampler(run).sample(0, 4, steps=2)
    b = load_sampler(exported).sample(0, 4, steps=2)
    assert a.tobytes() == b.tobytes()


def test_export_is_a_teacher_and_init_from_source(run, exported):
    """load_ema_params (sCD teacher, init_from) reads an export and checks its architecture."""
    cfg = smoke_config("mnist:smoke")
    _, run_cfg, name = load_ema_params(exported, cfg.model, None)
    assert name == "halflife" and run_cfg["objective"] == "sct"
    with cfg.unlocked():
        cfg.model.model_channels = 16
    with pytest.raises(ValueError, match="another architecture"):
        load_ema_params(exported, cfg.model, None, what="teacher")
    with pytest.raises(ValueError, match=r"is an export of EMA .halflife.; no .power_0\.100."):
        load_ema_params(exported, None, None, ema="power_0.100")


def test_stablehlo_round_trip_is_bit_exact(run, tmp_path):
    """The serialized samplers and network, deserialized, are bit-exact against the jitted
    function, at two batch sizes (symbolic batch), and agree with load_sampler's samples."""
    out = tmp_path / "shlo"
    assert cli.main(["export", "--workdir", str(run), "--to", "stablehlo", "--out", str(out)]) == 0
    state = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    sampler = load_sampler(run)
    for steps in (1, 2):
        exp = stablehlo.deserialize((out / f"sample_{steps}step.stablehlo").read_bytes())
        assert set(exp.platforms) == {"cpu", "cuda", "tpu"}
        times = sampling.consistency_times(steps, cfg["t_max"], cfg["t_mid"])
        scale = data_scale(cfg["dataset"], cfg["sigma_d"])  # MNIST: normalised, decoded here
        assert not scale.identity
        fn = jax.jit(stablehlo.make_sampler_fn(sampler.nd, times, cfg["sigma_d"], scale))
        for b in (3, 5) if steps == 2 else (3,):
            key = jax.random.key(b)
            noise = stablehlo.consistency_noise(key, (b, 28, 28, 1), steps)
            labels = np.arange(b, dtype=np.int32) % 10
            got = np.asarray(exp.call(state, noise, labels))
            assert got.tobytes() == np.asarray(fn(state, noise, labels)).tobytes()
            want = np.asarray(sampler.sample_batch(key, b, steps, labels))
            np.testing.assert_allclose(got, want, atol=1e-5)
    net = stablehlo.deserialize((out / "network.stablehlo").read_bytes())
    x, t = np.ones((2, 28, 28, 1), np.float32), np.array([0.5, 1.0], np.float32)
    F = np.asarray(net.call(state, x, t, np.array([1, -1], np.int32)))
    np.testing.assert_allclose(F, np.asarray(sampler.network(x, t, [1, -1])), atol=1e-6)


def test_export_torch_cli(run, tmp_path, capsys):
    """--to torch writes the folder and checks the PyTorch module against JAX."""
    pytest.importorskip("torch", reason="needs PyTorch (pip install 'scm-jax[torch]')")
    out = tmp_path / "torch"
    assert cli.main(["export", "--workdir", str(run), "--to", "torch", "--out", str(out)]) == 0
    err = float(capsys.readouterr().out.strip().rsplit("=", 1)[1])
    assert err < 1e-5


def _fails(argv, capsys, *fragments) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def test_export_bad_inputs(run, exported, tmp_path, capsys, monkeypatch):
    """Each mistake is one clear line (exit 2), and nothing is overwritten."""
    base = ["export", "--workdir", str(run), "--out", str(tmp_path / "o")]
    _fails([*base, "--to", "tflite"], capsys, "unknown format", "safetensors, torch, onnx")
    _fails([*base, "--to", "safetensors", "--step", "7"], capsys, "no checkpoint at step 7")
    _fails([*base, "--to", "safetensors", "--ema", "nope"], capsys, "no 'nope'")
    # A corrupt weights file, and a folder without config.json.
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text((exported / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    _fails(
        ["export", "--workdir", str(bad), "--to", "safetensors", "--out", str(tmp_path / "p")],
        capsys,
        "is not a readable safetensors file",
    )
    (bad / "config.json").unlink()
    _fails(
        ["export", "--workdir", str(bad), "--to", "safetensors", "--out", str(tmp_path / "p")],
        capsys,
        "no config.json",
    )
    with pytest.raises(FileNotFoundError, match="not a training run's folder"):
        load_sampler(bad)
    # --out: a file, a path below a file, a folder with other content (left as it was).
    (tmp_path / "file").write_text("x")
    _fails([*base[:-1], str(tmp_path / "file"), "--to", "safetensors"], capsys, "is a file")
    _fails(
        [*base[:-1], str(tmp_path / "file" / "sub"), "--to", "safetensors"],
        capsys,
        "is not writable",
    )
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    _fails([*base[:-1], str(tmp_path / "busy"), "--to", "safetensors"], capsys, "other files")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    # torch (or onnx) not installed.
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    _fails([*base, "--to", "torch"], capsys, "pip install 'scm-jax[torch]'")
    _fails([*base, "--to", "onnx"], capsys, "pip install 'scm-jax[torch,export]'")
    assert not (tmp_path / "o").exists()


def test_stablehlo_tiny_model_with_guidance_input():
    """A tiny U-Net with labels and a guidance input: the serialized 2-step sampler, deserialized,
    is bit-exact against the jitted function."""
    from helpers import randomize, tiny_unet

    from scm_jax.run.state_dict import to_state_dict

    nd = tiny_unet()
    state = to_state_dict(jax.tree.map(np.asarray, randomize(nd.init(jax.random.key(0))["net"], 1)))
    exp = stablehlo.export_sampler(nd, state, 2, sigma_d=0.5, t_max=1.56, t_mid=1.1)
    back = stablehlo.deserialize(stablehlo.serialize(exp))
    noise = stablehlo.consistency_noise(jax.random.key(1), (3, 8, 8, 3), 2)
    y, g = np.array([0, -1, 4], np.int32), np.array([1.0, 1.5, 2.0], np.float32)
    fn = jax.jit(stablehlo.make_sampler_fn(nd, (1.56, 1.1), 0.5))
    assert (
        np.asarray(back.call(state, noise, y, g)).tobytes()
        == np.asarray(fn(state, noise, y, g)).tobytes()
    )
    with pytest.raises(ValueError, match=r"not a serialized jax\.export function"):
        stablehlo.deserialize(b"\x00not flatbuffers")
