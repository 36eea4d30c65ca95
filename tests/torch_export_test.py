"""The PyTorch twin of the networks (scm_jax.torch), its samplers, ONNX, and the EDM2 importer:
parity with JAX on tiny and small models with random non-trivial parameters (float32)."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SIGMA_D, randomize

from scm_jax import sampling, trigflow
from scm_jax.config import defaults
from scm_jax.data.scale import DataScale
from scm_jax.export.stablehlo import consistency_noise
from scm_jax.networks import build_network
from scm_jax.run.exports import export_config, load_export, save_export, tree_equal
from scm_jax.run.state_dict import to_state_dict

torch = pytest.importorskip("torch", reason="needs PyTorch (pip install 'scm-jax[torch]')")
scm_torch = pytest.importorskip("scm_jax.torch")

TINY = dict(
    arch="edm2_unet",
    img_resolution=8,
    img_channels=3,
    num_classes=5,
    model_channels=8,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(4,),
    channels_per_head=8,
    guidance_input=True,
    sigma_d=SIGMA_D,
)
MLP = dict(
    arch="mlp",
    data_dim=3,
    hidden=16,
    depth=2,
    emb_channels=8,
    num_classes=4,
    guidance_input=True,
    sigma_d=SIGMA_D,
)
CASES = {
    "unet_sCM": TINY,  # adn, positional, c_noise t, labels, guidance, attention
    "unet_stock_edm2": {
        **TINY,
        "time_embedding": "fourier",
        "c_noise_mode": "edm",
        "modulation": "mul",
    },
    "unet_edm2_fourier_uncond": {
        **TINY,
        "time_embedding": "edm2_fourier",
        "num_classes": 0,
        "guidance_input": False,
        "c_noise_scale": 2.0,
    },
    "unet_3_levels": {
        **TINY,
        "img_resolution": 16,
        "channel_mult": (1, 2, 2),
        "num_blocks": 2,
        "attn_resolutions": (16, 4),
        "clip_act": 0.5,
    },
    "unet_adagn": {**TINY, "modulation": "adagn"},
    "mlp_adn": MLP,
    "mlp_adagn_fourier_scaled": {
        **MLP,
        "modulation": "adagn",
        "time_embedding": "fourier",
        "c_noise_scale": 16.0,
    },
    "mlp_mul_fourier": {
        **MLP,
        "modulation": "mul",
        "time_embedding": "fourier",
        "c_noise_mode": "edm",
        "num_classes": 0,
    },
    "small_mnist": dict(defaults.load_config("mnist:smoke").model),
}


def make(cfg, seed=0):
    """(JAX NetworkDef, random non-trivial params, PyTorch module with the same weights)."""
    nd = build_network(cfg)
    params = randomize(nd.init(jax.random.key(seed))["net"], seed + 1)
    if cfg["arch"] == "mlp":  # an output of order 1 (the MLP's F is ~0.01 at gain 0.5)
        params = {**params, "out_gain": jnp.asarray(2.0)}
    net = scm_torch.build_network(cfg)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in to_state_dict(params).items()})
    return nd, params, net.eval()


def inputs(nd, b=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, *nd.sample_shape)).astype(np.float32)
    t = np.linspace(0.05, 1.55, b).astype(np.float32)
    y = np.array([0, -1, 3] * b, np.int32)[:b] if nd.num_classes else None
    g = np.linspace(1.0, 2.0, b).astype(np.float32) if nd.guidance_input else None
    return x, t, y, g


def to_t(a, images=True):
    """numpy (JAX layout) -> torch tensor (NCHW for images; labels int64)."""
    if a is None:
        return None
    if a.dtype == np.int32:
        return torch.from_numpy(a.astype(np.int64))
    perm = {4: (0, 3, 1, 2), 5: (0, 1, 4, 2, 3)}.get(a.ndim) if images else None
    return torch.from_numpy(np.array(a.transpose(perm) if perm else a, order="C"))


def from_t(a):
    a = a.detach().numpy()
    perm = {4: (0, 2, 3, 1), 5: (0, 1, 3, 4, 2)}.get(a.ndim)
    return a.transpose(perm) if perm else a


@pytest.mark.parametrize("case", list(CASES))
def test_torch_network_equals_jax(case):
    """F_theta in PyTorch equals JAX within 1e-5 for every option (random weights and gains)."""
    nd, params, net = make(CASES[case])
    x, t, y, g = inputs(nd)
    F_jax = np.asarray(jax.jit(nd.apply_fn)(params, x, t, y, g))
    with torch.no_grad():
        F_torch = from_t(net(to_t(x), to_t(t), to_t(y), to_t(g)))
    assert 0.1 < np.abs(F_jax).max() < 10  # a non-trivial output of order 1
    np.testing.assert_allclose(F_torch, F_jax, atol=1e-5, rtol=0)


def test_low_precision_compute_dtype():
    """model.dtype='bfloat16' computes in bfloat16 in both frameworks: they agree to bf16
    rounding (the JAX network's own bf16-vs-float32 difference is of the same size)."""
    nd, params, net = make({**TINY, "dtype": "bfloat16"})
    x, t, y, g = inputs(nd)
    F_jax = np.asarray(jax.jit(nd.apply_fn)(params, x, t, y, g)).astype(np.float32)
    with torch.no_grad():
        F_torch = from_t(net(to_t(x), to_t(t), to_t(y), to_t(g))).astype(np.float32)
    assert np.abs(F_torch - F_jax).max() < 0.05 * np.abs(F_jax).max()


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("case", ["unet_sCM", "mlp_adn", "small_mnist"])
def test_torch_sampler_equals_jax(case, steps):
    """The PyTorch 1- and 2-step samplers give the JAX sampler's samples for the same noise."""
    nd, params, net = make(CASES[case])
    b, key = 3, jax.random.key(7)
    _, _, y, g = inputs(nd, b)
    times = sampling.consistency_times(steps, trigflow.t_max(80.0, SIGMA_D), 1.1)
    x_jax = sampling.make_consistency_sampler(nd.apply_fn, (b, *nd.sample_shape), times, SIGMA_D)(
        params, key, None if y is None else jnp.asarray(y), None if g is None else jnp.asarray(g)
    )
    noise = np.asarray(consistency_noise(key, (b, *nd.sample_shape), steps))
    with torch.no_grad():
        x_torch = scm_torch.sample_consistency(net, to_t(noise), times, SIGMA_D, to_t(y), to_t(g))
    np.testing.assert_allclose(from_t(x_torch), np.asarray(x_jax), atol=1e-5, rtol=0)


def test_jvp_autocast_channels_last_and_grad():
    """torch.func.jvp matches jax.jvp (sCM's tangent); bf16 autocast, channels_last, backward."""
    nd, params, net = make(TINY)
    x, t, y, g = inputs(nd)
    F = lambda x, t: nd.apply_fn(params, x, t, y, g)
    tangent = jax.jit(lambda x, t: jax.jvp(F, (x, t), (x, jnp.ones_like(t))))
    _, dF_jax = tangent(jnp.asarray(x), jnp.asarray(t))
    xt, tt = to_t(x), to_t(t)
    _, dF = torch.func.jvp(
        lambda a, b: net(a, b, to_t(y), to_t(g)), (xt, tt), (xt, torch.ones_like(tt))
    )
    np.testing.assert_allclose(from_t(dF), np.asarray(dF_jax), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        ref = net(xt, tt, to_t(y), to_t(g))
        cl = net(xt.to(memory_format=torch.channels_last), tt, to_t(y), to_t(g))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = net(xt, tt, to_t(y), to_t(g))
    np.testing.assert_allclose(cl.numpy(), ref.numpy(), atol=1e-6)
    assert bf.dtype == torch.float32 and float((bf - ref).abs().max()) < 0.1 * float(
        ref.abs().max()
    )
    net(xt, tt, to_t(y), to_t(g)).square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.slow
def test_torch_compile():
    """torch.compile of the PyTorch network gives the eager result."""
    nd, _, net = make(MLP)
    x, t, y, g = (to_t(a) for a in inputs(nd))
    compiled = torch.compile(net)
    with torch.no_grad():
        np.testing.assert_allclose(compiled(x, t, y, g).numpy(), net(x, t, y, g).numpy(), atol=1e-6)


def test_safetensors_round_trip_through_torch(tmp_path):
    """JAX -> safetensors -> PyTorch -> safetensors -> JAX gives bit-identical parameters."""
    from safetensors.torch import save_file

    cfg = {**TINY, "time_embedding": "edm2_fourier"}
    nd = build_network(cfg)
    params = jax.tree.map(np.asarray, randomize(nd.init(jax.random.key(0))["net"], 1))
    run = {
        "model": cfg,
        "objective": "sct",
        "trigflow": {"sigma_d": SIGMA_D, "sigma_max": 80.0, "t_mid": 1.1},
    }
    save_export(tmp_path / "a", params, export_config(run, ema="x", step=1, source="test"))
    net = scm_torch.load_network(tmp_path / "a")
    assert set(net.state_dict()) == set(to_state_dict(params))
    (tmp_path / "b").mkdir()
    save_file(net.state_dict(), str(tmp_path / "b" / "model.safetensors"))
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    back, _ = load_export(tmp_path / "b")
    assert tree_equal(back, params)


def test_unsupported_option_refused():
    """An option the PyTorch port does not have is refused by name, never silently dropped."""
    with pytest.raises(ValueError, match="not implemented in the PyTorch port"):
        scm_torch.build_network({**TINY, "new_option": 1})
    with pytest.raises(ValueError, match=r"model\.time_embedding='learned'"):
        scm_torch.build_network({**TINY, "time_embedding": "learned"})


def test_torch_imported_only_where_needed():
    """`import scm_jax`, the export code and training import no torch; scm_jax.torch says how to
    install it where it is missing; the subpackage never shadows the real torch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import scm_jax, scm_jax.export.command, scm_jax.run.exports, scm_jax.run.sampler\n"
        "import scm_jax.train.loop, scm_jax.cli\n"
        "try:\n    import scm_jax.torch\nexcept ImportError as e:\n    print('HINT', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HINT scm_jax.torch needs PyTorch: pip install 'scm-jax[torch]'" in out.stdout
    import scm_jax.torch.unet as unet_module

    assert unet_module.torch is torch and "scm_jax" not in torch.__file__
    assert issubclass(scm_torch.UNet, torch.nn.Module)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unet_sCM", "small_mnist"])
def test_onnx_network_and_samplers(tmp_path, case):
    """network.onnx and the 1-/2-step sampler ONNX files (dynamic batch) in ONNX Runtime equal
    JAX within 1e-4."""
    ort = pytest.importorskip("onnxruntime", reason="needs pip install 'scm-jax[export]'")
    pytest.importorskip("onnxscript", reason="needs pip install 'scm-jax[export]'")
    from scm_jax.export.onnx_export import export_onnx

    model = CASES[case]
    nd, params, _ = make(model)
    channels = model.get("img_channels", model.get("data_dim", 1))
    scale = DataScale(tuple(-0.1 * np.arange(channels)), tuple(0.3 + 0.1 * np.arange(channels)),
                      SIGMA_D)  # fmt: skip
    run = {
        "model": model,
        "objective": "sct",
        "trigflow": {"sigma_d": SIGMA_D, "sigma_max": 80.0, "t_mid": 1.1},
        "dataset": {"normalize": "per_channel", "mean": scale.mean, "std": scale.std},
    }
    cfg = export_config(run, ema="x", step=1, source="test")
    save_export(tmp_path, jax.tree.map(np.asarray, params), cfg)
    errors = export_onnx(tmp_path, tmp_path, samplers=(2,))
    assert set(errors) == {"network.onnx", "sample_2step.onnx"}
    b = 4  # traced with 2
    x, t, y, g = inputs(nd, b)
    cond = {"labels": None if y is None else y.astype(np.int64), "guidance": g}
    cond = {k: v for k, v in cond.items() if v is not None}
    F = ort.InferenceSession(str(tmp_path / "network.onnx")).run(
        None, {"x_scaled": to_t(x).numpy(), "t": t, **cond}
    )[0]
    F_jax = np.asarray(jax.jit(nd.apply_fn)(params, x, t, y, g))
    np.testing.assert_allclose(from_t(torch.from_numpy(F)), F_jax, atol=1e-4)
    key, times = jax.random.key(3), sampling.consistency_times(2, cfg["t_max"], 1.1)
    noise = np.asarray(consistency_noise(key, (b, *nd.sample_shape), 2))
    x0 = ort.InferenceSession(str(tmp_path / "sample_2step.onnx")).run(
        None, {"noise": to_t(noise).numpy(), **cond}
    )[0]
    want = sampling.make_consistency_sampler(nd.apply_fn, (b, *nd.sample_shape), times, SIGMA_D)(
        params, key, y, g
    )  # model units; the ONNX sampler returns data units
    want = scale.decode(np.asarray(want))
    np.testing.assert_allclose(from_t(torch.from_numpy(x0)), want, atol=1e-4)


# --- EDM2 importer ------------------------------------------------------------------------------

EDM2_ARCH = dict(model_channels=8, mult=(1, 2), blocks=1, attn=(4,), cph=8)


def edm2_reference(label_dim=5, res=8, channels=3, **arch):
    from tests.edm2_reference import Precond

    torch.manual_seed(0)
    net = Precond(res, channels, label_dim, **{**EDM2_ARCH, **arch}).eval()
    with torch.no_grad():  # non-trivial gains (EDM2 initialises them at 0)
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.copy_(torch.tensor(0.3 + 0.1 * len(name) % 0.7))
    return net


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_edm2_import_gives_edm2_denoiser(tmp_path, fmt):
    """The imported model used as our TrigFlow teacher gives EDM2's D(x; sigma)."""
    from safetensors.torch import save_file

    from scm_jax.export.edm2 import import_edm2
    from scm_jax.run.sampler import load_sampler

    ref = edm2_reference()
    src = tmp_path / f"edm2.{fmt}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(src)) if fmt == "safetensors" else torch.save(state, src)
    cfg = import_edm2(src, tmp_path / "teacher", channels_per_head=EDM2_ARCH["cph"])
    assert cfg["model"]["time_embedding"] == "edm2_fourier" and cfg["objective"] == "diffusion"
    sampler = load_sampler(tmp_path / "teacher")
    rng = np.random.default_rng(0)
    sigma = np.array([0.05, 1.0, 20.0], np.float32)
    x_sigma = rng.standard_normal((3, 8, 8, 3)) * np.sqrt(0.25 + sigma[:, None, None, None] ** 2)
    labels = np.array([1, 4, -1], np.int32)
    t = np.arctan(sigma / SIGMA_D).astype(np.float32)
    x_t = (np.cos(t)[:, None, None, None] * x_sigma).astype(np.float32)
    F = sampler.network(x_t / SIGMA_D, t, labels)
    D_ours = np.asarray(trigflow.denoiser(jnp.asarray(x_t), t, F, SIGMA_D))
    onehot = torch.from_numpy(np.eye(5, dtype=np.float32)[labels] * (labels >= 0)[:, None])
    with torch.no_grad():
        D_edm2 = ref(to_t(x_sigma.astype(np.float32)), torch.from_numpy(sigma), onehot)
    np.testing.assert_allclose(D_ours, from_t(D_edm2), atol=2e-5 * np.abs(x_sigma).max())


def test_edm2_import_errors(tmp_path, capsys):
    """A pickle, a file of other tensors: one clear line through the CLI, nothing written."""
    from scm_jax import cli
    from scm_jax.export.edm2 import import_edm2

    (tmp_path / "snap.pkl").write_bytes(b"\x80\x04")
    argv = ["import-edm2", "--from", str(tmp_path / "snap.pkl"), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pickles that only EDM2's own code can load" in err
    assert "torch.save(net.state_dict()" in err and not (tmp_path / "out").exists()
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an EDM2 UNet state dict"):
        import_edm2(tmp_path / "other.safetensors", tmp_path / "out")


@pytest.mark.slow
def test_scd_starts_from_imported_edm2(tmp_path):
    """sCD trains from an imported EDM2 teacher (student initialised from it)."""
    from helpers import quiet, smoke_config
    from safetensors.torch import save_file

    from scm_jax.export.edm2 import import_edm2
    from scm_jax.train.loop import train

    m = defaults.load_config("mnist:smoke").model
    ref = edm2_reference(
        label_dim=m.num_classes,
        res=m.img_resolution,
        channels=m.img_channels,
        model_channels=m.model_channels,
        mult=tuple(m.channel_mult),
        blocks=m.num_blocks,
        attn=tuple(m.attn_resolutions),
        cph=m.channels_per_head,
    )
    save_file(ref.state_dict(), str(tmp_path / "edm2.safetensors"))
    import_edm2(
        tmp_path / "edm2.safetensors", tmp_path / "teacher", channels_per_head=m.channels_per_head
    )
    cfg = smoke_config(
        "mnist:smoke,objective=scd",
        **{
            "teacher.workdir": str(tmp_path / "teacher"),
            "dataset.normalize": "none",  # EDM2's teachers see the data as it is
            "model.time_embedding": "edm2_fourier",
            "model.c_noise_mode": "edm",
            "model.modulation": "mul",
        },
    )
    out = train(cfg, tmp_path / "student", log=quiet)
    assert out["step"] == 2 and out["interrupted"] is None
    assert math.isfinite(out.get("loss", 0.0))


def test_load_network_errors(tmp_path):
    """A folder without config.json, a damaged weights file, weights of another network."""
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        scm_torch.load_network(tmp_path)
    run = {"model": MLP, "objective": "sct", "trigflow": {"sigma_d": 0.5, "sigma_max": 80.0,
                                                          "t_mid": 1.1}}  # fmt: skip
    nd = build_network(MLP)
    params = jax.tree.map(np.asarray, nd.init(jax.random.key(0))["net"])
    save_export(tmp_path, params, export_config(run, ema="x", step=1, source="test"))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        scm_torch.load_network(tmp_path)
    from safetensors.numpy import save_file

    save_file(
        {"in_linear.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(ValueError, match="does not fit the config's network"):
        scm_torch.load_network(tmp_path)
