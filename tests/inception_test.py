"""The FID Inception-v3: shapes, pools, resizes, the weights file, and agreement with PyTorch.

Without weights or PyTorch the architecture, the resizes and the loader's errors are checked. With
PyTorch, the resizes are compared with PyTorch's and pytorch-fid's key layout is converted; with
``../shared/data/inception/inception_v3_fid_torchscript.pt`` too, features are compared with the
TorchScript model's on CIFAR-10 test images.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.eval import fid_weights
from scm_jax.eval.inception import (
    RESIZE_METHODS,
    expected_shapes,
    inception_features,
    load_inception,
    resize_images,
    save_inception,
    to_inception_range,
)
from scm_jax.eval.inception_net import (
    FEATURE_DIM,
    InceptionV3,
    avg_pool_3x3_valid,
    max_pool_3x3,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TORCHSCRIPT = DATA / "inception" / "inception_v3_fid_torchscript.pt"
CIFAR_TEST = DATA / "cifar10_jpeg" / "test.tar.gz"


def random_flat(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays of every parameter (BN variances positive)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for k, shape in expected_shapes().items():
        v = rng.standard_normal(shape, np.float32) * 0.05
        flat[k] = np.abs(v) + 0.5 if k.endswith(("/var", "/scale")) else v
    return flat


def unflatten(flat):
    from flax import traverse_util

    return jax.device_put(traverse_util.unflatten_dict(dict(flat), sep="/"))


# ---------------------------------------------------------------- architecture, no weights


def test_forward_at_75x75_on_random_params():
    params = unflatten(random_flat())
    x = jax.random.uniform(jax.random.key(0), (2, 75, 75, 3), jnp.float32, -1, 1)
    y = jax.jit(lambda p, x: InceptionV3().apply({"params": p}, x))(params, x)
    assert y.shape == (2, FEATURE_DIM) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(y >= 0))  # a mean of ReLUs


def test_parameter_tree_matches_the_fid_graph():
    shapes = expected_shapes()
    kernels = {k: s for k, s in shapes.items() if k.endswith("/kernel")}
    assert len(kernels) == 94  # 94 conv + BN layers, like both PyTorch ports
    assert sum(int(np.prod(s)) for s in kernels.values()) == 21_751_136
    assert kernels["Conv2d_1a_3x3/kernel"] == (3, 3, 3, 32)
    assert kernels["Mixed_6b/branch7x7_2/kernel"] == (1, 7, 128, 128)
    assert kernels["Mixed_7c/branch3x3dbl_3b/kernel"] == (3, 1, 384, 384)
    assert kernels["Mixed_7c/branch_pool/kernel"] == (1, 1, 2048, 192)


def test_features_of_any_size_are_2048_floats():
    params = _abstract_tree(
        {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in expected_shapes().items()}
    )
    gray = jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32)  # MNIST-like: repeated to RGB
    out = jax.eval_shape(inception_features, params, gray)
    assert out.shape == (3, FEATURE_DIM) and out.dtype == jnp.float32
    for method in RESIZE_METHODS:
        for shape in [(2, 32, 32, 3), (1, 512, 384, 3), (1, 299, 299, 3)]:
            x = jax.ShapeDtypeStruct(shape, jnp.float32)
            out = jax.eval_shape(lambda x, m=method: resize_images(x, 299, m), x)
            assert out.shape == (shape[0], 299, 299, 3) and out.dtype == jnp.float32


def _abstract_tree(flat):
    from flax import traverse_util

    return traverse_util.unflatten_dict(dict(flat), sep="/")


def test_feature_input_errors():
    params = _abstract_tree(
        {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in expected_shapes().items()}
    )
    with pytest.raises(TypeError, match="to_inception_range"):
        inception_features(params, jnp.zeros((1, 32, 32, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        inception_features(params, jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="unknown resize"):
        inception_features(params, jnp.zeros((1, 32, 32, 3)), "lanczos")


def test_pools_follow_tf_same_padding():
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    avg = avg_pool_3x3_valid(x)[0, :, :, 0]
    assert float(avg[0, 0]) == pytest.approx((0 + 1 + 4 + 5) / 4)  # 4 valid pixels, not 9
    assert float(avg[1, 1]) == pytest.approx(5.0)
    neg = -1.0 - x  # all negative: zero padding would win a max
    mx = max_pool_3x3(neg, 1, 1)[0, :, :, 0]
    assert float(mx[0, 0]) == -1.0
    assert max_pool_3x3(x, 2, 0).shape == (1, 1, 1, 1)


# ---------------------------------------------------------------- resizes and input scaling


def test_resizes_keep_constants_and_identity():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
    for method in RESIZE_METHODS:
        np.testing.assert_array_equal(resize_images(x, 299, method), x)
        c = resize_images(np.full((1, 32, 40, 3), 0.25, np.float32), 299, method)
        assert c.shape == (1, 299, 299, 3)
        np.testing.assert_allclose(c, 0.25, atol=1e-6)
    with pytest.raises(ValueError, match="unknown resize"):
        resize_images(x, 299, "area")


def test_tf1_bilinear_samples_at_dst_times_scale():
    # 1-D ramp 0..3 to 8 pixels: source positions 0, 0.5, 1, ..., 3, 3.5 -> clamped at 3.
    x = jnp.broadcast_to(jnp.arange(4.0)[None, None, :, None], (1, 4, 4, 1))
    row = np.asarray(resize_images(x, 8, "tf1-bilinear"))[0, 0, :, 0]
    np.testing.assert_allclose(row, [0, 0.5, 1, 1.5, 2, 2.5, 3, 3])
    half = np.asarray(resize_images(x, 8, "torch-bilinear"))[0, 0, :, 0]
    np.testing.assert_allclose(half, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])


def test_uint8_conventions():
    u = np.array([0, 128, 255], np.uint8)
    np.testing.assert_allclose(to_inception_range(u, "tf"), [-1, 0, 127 / 128])
    np.testing.assert_allclose(
        to_inception_range(u, "pytorch-fid"), [-1, 128 / 127.5 - 1, 1], atol=1e-6
    )
    with pytest.raises(ValueError, match="convention"):
        to_inception_range(u, "clean")


# ---------------------------------------------------------------- the weights file


def test_weights_file_round_trip(tmp_path):
    flat = random_flat(2)
    meta = {"variant": "pytorch-fid", "source_file": "x.pth", "source_sha256": "0" * 64}
    out = save_inception(tmp_path / "inception_fid.npz", flat, meta)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(out.read_bytes()[: 1 << 20])
    with pytest.raises(ValueError, match=r"truncated\.npz is not an \.npz"):
        load_inception(truncated)
    params, info = load_inception(tmp_path)  # the folder works too
    assert info["variant"] == "pytorch-fid" and info["source_sha256"] == "0" * 64
    assert info["format_version"] == 1 and info["path"].endswith("inception_fid.npz")
    np.testing.assert_array_equal(params["Mixed_7c"]["branch_pool"]["kernel"],
                                  flat["Mixed_7c/branch_pool/kernel"])  # fmt: skip


def test_loader_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="scm-jax fid-weights"):
        load_inception(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError, match=r"junk\.npz is not an \.npz.*fid-weights"):
        load_inception(junk)
    other = tmp_path / "other.npz"
    np.savez(other, w=np.zeros(3))
    with pytest.raises(ValueError, match=r"other\.npz has no '__meta__'.*fid-weights"):
        load_inception(other)
    meta = json.dumps({"format": "scm-jax/inception-v3-fid", "variant": "pytorch-fid"})
    shapes = tmp_path / "shapes.npz"
    arrays = {k: np.zeros((1,), np.float32) for k in expected_shapes()}
    np.savez(shapes, __meta__=np.array(meta), **arrays)
    with pytest.raises(ValueError, match=r"shapes\.npz: not the FID.*wrong shape"):
        load_inception(shapes)
    some = tmp_path / "some.npz"
    np.savez(some, __meta__=np.array(meta), **{"Conv2d_1a_3x3/kernel": np.zeros((3, 3, 3, 32))})
    with pytest.raises(ValueError, match=r"some\.npz: not the FID.*missing arrays"):
        load_inception(some)
    wrong_variant = tmp_path / "variant.npz"
    np.savez(wrong_variant, __meta__=np.array(json.dumps({"format": "other"})))
    with pytest.raises(ValueError, match=r"variant\.npz: format 'other'"):
        load_inception(wrong_variant)


def test_converter_without_torch_says_how_to_install(tmp_path, monkeypatch):
    src = tmp_path / "weights.pth"
    src.write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError, match=r"scm-jax\[torch\]"):
        fid_weights.convert(src, tmp_path / "out.npz")


def test_converter_agrees_with_the_loader_on_the_file_name():
    from scm_jax.eval import inception

    assert fid_weights.WEIGHTS_FILENAME == inception.WEIGHTS_FILENAME
    assert f"{inception.META_KEY}.npy" == "__meta__.npy"


def test_cli_reports_a_missing_file(tmp_path, capsys):
    assert fid_weights.main(["--from", str(tmp_path / "nope.pt"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------- with PyTorch


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="needs PyTorch (pip install 'scm-jax[torch]')")


@pytest.mark.parametrize("hw", [(32, 32), (64, 48), (512, 384)])
def test_resizes_match_pytorch(torch, hw):
    import torch.nn.functional as F  # noqa: N812

    x = np.random.default_rng(3).uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    ours = np.asarray(resize_images(x, 299, "torch-bilinear"))
    ref = F.interpolate(t, (299, 299), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    # TF1 ResizeBilinear as StyleGAN's detector does it: an affine grid shifted to sample at
    # dst * in / out, border-clamped. grid_sample's normalised coordinates cost ~1e-4.
    theta = torch.tensor([[1, 0, 1 / hw[1] - 1 / 299], [0, 1, 1 / hw[0] - 1 / 299]])
    grid = F.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
    ref = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ours = np.asarray(resize_images(x, 299, "tf1-bilinear"))
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=3e-4)


def test_bicubic_aa_matches_pil():
    from PIL import Image

    x = np.random.default_rng(4).uniform(-1, 1, (1, 48, 40, 3)).astype(np.float32)
    ours = np.asarray(resize_images(x, 299, "bicubic-aa"))[0]
    ref = [Image.fromarray(x[0, :, :, c], mode="F").resize((299, 299), Image.BICUBIC)
           for c in range(3)]  # fmt: skip
    np.testing.assert_allclose(ours, np.clip(np.stack(ref, -1), -1, 1), atol=1e-4)


def _pytorch_fid_state_dict(torch, flat, classes=1008, wrapper=False):
    """A pytorch-fid style state dict holding ``flat`` (torchvision names)."""
    sd = {}
    for key, v in flat.items():
        layer, field = key.rsplit("/", 1)
        name = layer.replace("/", ".")
        if field == "kernel":
            sd[f"{name}.conv.weight"] = torch.from_numpy(np.transpose(v, (3, 2, 0, 1)).copy())
        else:
            bn = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
            sd[f"{name}.bn.{bn[field]}"] = torch.from_numpy(v.copy())
            sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    if wrapper:
        blocks = fid_weights._WRAPPER_BLOCKS
        index = {n: f"blocks.{i}.{j}" for i, b in enumerate(blocks) for j, n in enumerate(b)}
        sd = {f"{index[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in sd.items()}
    else:
        sd["fc.weight"] = torch.zeros(classes, 2048)
        sd["fc.bias"] = torch.zeros(classes)
    return sd


def test_pytorch_fid_layouts_convert(torch, tmp_path, capsys):
    flat = random_flat(5)
    src = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(_pytorch_fid_state_dict(torch, flat), src)
    assert fid_weights.main(["--from", str(src), "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "variant pytorch-fid" in printed and "not the file this converter" in printed
    params, info = load_inception(tmp_path / "a")
    assert info["variant"] == "pytorch-fid" and info["known_source"] is False
    got = {k: np.asarray(v) for k, v in _flatten(params).items()}
    assert set(got) == set(flat)
    for k in flat:
        np.testing.assert_array_equal(got[k], flat[k], err_msg=k)
    torch.save(_pytorch_fid_state_dict(torch, flat, wrapper=True), src)  # InceptionV3 wrapper
    info = fid_weights.convert(src, tmp_path / "b.npz")
    assert info["variant"] == "pytorch-fid" and info["arrays"] == len(flat)
    torch.save(_pytorch_fid_state_dict(torch, flat, classes=1000), src)
    with pytest.raises(ValueError, match="torchvision's ImageNet"):
        fid_weights.convert(src, tmp_path / "c.npz")
    torch.save({"something": torch.zeros(3)}, src)
    with pytest.raises(ValueError, match="not pytorch-fid's Inception"):
        fid_weights.convert(src, tmp_path / "d.npz")
    src.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="not a TorchScript archive or a PyTorch state dict"):
        fid_weights.convert(src, tmp_path / "e.npz")
    with pytest.raises(ValueError, match="already converted"):
        fid_weights.convert(tmp_path / "b.npz", tmp_path / "f.npz")


def _flatten(params):
    from flax import traverse_util

    return traverse_util.flatten_dict(params, sep="/")


def cifar_images(n: int) -> np.ndarray:
    """The first ``n`` CIFAR-10 test JPEGs, ``(n, 32, 32, 3)`` uint8."""
    from PIL import Image

    out = []
    with tarfile.open(CIFAR_TEST) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                data = tar.extractfile(member).read()
                out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                if len(out) == n:
                    break
    return np.stack(out)


@pytest.mark.slow
@pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.load:DeprecationWarning")
def test_features_match_the_torchscript_model(torch, tmp_path, optimized):
    if not TORCHSCRIPT.is_file():
        pytest.skip(f"needs the TorchScript Inception at {TORCHSCRIPT} (absent in this checkout)")
    summary = fid_weights.convert(TORCHSCRIPT, tmp_path / "inception_fid.npz")
    assert summary["variant"] == "torchscript-stylegan3" and summary["known_source"]
    assert summary["arrays"] == 470 and summary["ignored"] == []
    params, info = load_inception(tmp_path)
    assert info["variant"] == "torchscript-stylegan3"
    assert info["source_sha256"] == fid_weights.KNOWN_TORCHSCRIPT_SHA256

    if CIFAR_TEST.is_file():
        u8 = cifar_images(8)
    else:  # deterministic stand-ins
        u8 = np.random.default_rng(6).integers(0, 256, (8, 32, 32, 3), np.uint8)
    x32 = to_inception_range(u8, "tf")  # the TF graph's (u - 128) / 128
    x299 = np.asarray(resize_images(x32, 299, "tf1-bilinear"))
    ours = np.asarray(inception_features(params, x32))  # resizes inside, as x299 was made

    model = torch.jit.load(str(TORCHSCRIPT), map_location="cpu").eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x299.copy()).permute(0, 3, 1, 2).contiguous()).numpy()
    assert ref.shape == ours.shape == (8, 2048)
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"\nInception vs TorchScript on 8 images: max rel {rel.max():.2e}, "
          f"max abs {np.abs(ours - ref).max():.2e} (features up to {ref.max():.2f})")  # fmt: skip
    assert rel.max() < 1e-3, rel
    assert rel.max() < 2e-5, rel  # what float32 with HIGHEST precision gives (about 3e-6)
