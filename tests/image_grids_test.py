"""Image helpers: value mapping, grid layout, PNG and npz round trips."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scm_jax import image_grids


def test_to_uint8_mapping():
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, np.nan], np.float32)
    np.testing.assert_array_equal(image_grids.to_uint8(x), [0, 0, 64, 128, 191, 255, 255, 0])
    assert image_grids.to_uint8(x).dtype == np.uint8
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 3, 1))
    np.testing.assert_array_equal(
        image_grids.to_uint8(x), np.round((x + 1) * 127.5).astype(np.uint8)
    )


def test_grid_layout():
    # 5 images of 2x2 in 3 columns: 2 rows; (2*(2+1)+1, 3*(2+1)+1) = (7, 10).
    vals = np.linspace(-0.8, 0.8, 5)
    x = np.broadcast_to(vals[:, None, None, None], (5, 2, 2, 3)).astype(np.float32)
    g = image_grids.make_grid(x, ncols=3, pad=1)
    assert g.shape == (7, 10, 3) and g.dtype == np.uint8
    cells = image_grids.to_uint8(vals)
    for i in range(5):
        r, c = divmod(i, 3)
        y, xx = 1 + 3 * r, 1 + 3 * c
        assert (g[y : y + 2, xx : xx + 2] == cells[i]).all()
    assert (g[0] == 0).all() and (g[:, 0] == 0).all() and (g[:, 3] == 0).all()  # padding
    assert (g[4:6, 7:9] == 0).all()  # unfilled sixth cell is black
    # Default: square-ish (ceil(sqrt(5)) = 3 columns); 1 channel stays 1; pad 0.
    assert image_grids.make_grid(x[..., :1]).shape == (7, 10, 1)
    assert image_grids.make_grid(x[..., :1], pad=0).shape == (4, 6, 1)
    assert image_grids.make_grid(x[:1], ncols=4).shape == (4, 4, 3)  # columns capped at N
    with pytest.raises(ValueError):
        image_grids.make_grid(np.zeros((0, 2, 2, 3)))


def test_png_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (5, 7, 1), dtype=np.uint8)
    image_grids.save_png(tmp_path / "a" / "rgb.png", rgb)
    image_grids.save_png(tmp_path / "gray.png", gray)
    with Image.open(tmp_path / "a" / "rgb.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), rgb)
    with Image.open(tmp_path / "gray.png") as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), gray[..., 0])
    with pytest.raises(ValueError, match="uint8"):
        image_grids.save_png(tmp_path / "f.png", rgb.astype(np.float32))

    x = rng.uniform(-1, 1, (4, 3, 3, 3)).astype(np.float32)
    grid = image_grids.save_grid(tmp_path / "grid.png", x, ncols=2)
    with Image.open(tmp_path / "grid.png") as im:
        np.testing.assert_array_equal(np.asarray(im), grid)
    assert grid.shape == (9, 9, 3)


def test_save_samples_npz(tmp_path):
    x = np.random.default_rng(2).normal(size=(3, 4, 4, 1)).astype(np.float64)
    image_grids.save_samples_npz(tmp_path / "s" / "samples.npz", x, labels=[0, 1, 2])
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["x"].dtype == np.float32
        np.testing.assert_allclose(f["x"], x, rtol=1e-6)
        np.testing.assert_array_equal(f["labels"], [0, 1, 2])
    image_grids.save_samples_npz(tmp_path / "nolabels.npz", x)
    with np.load(tmp_path / "nolabels.npz") as f:
        assert set(f.files) == {"x"}
    with pytest.raises(ValueError, match="labels"):
        image_grids.save_samples_npz(tmp_path / "bad.npz", x, labels=[0, 1])
