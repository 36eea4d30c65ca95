"""Deterministic, resumable, per-process batch order over in-memory data; npz loading."""

from __future__ import annotations

import numpy as np
import pytest

from scm_jax.data import ArrayDataset, batch_indices, get_batch, load_npz


def test_every_example_once_per_epoch_and_resumable():
    n, batch = 50, 8
    seen = np.concatenate([batch_indices(s, n, batch, seed=3)[0] for s in range(25)])  # 4 epochs
    for epoch in range(4):
        part = seen[epoch * n : (epoch + 1) * n]
        assert sorted(part.tolist()) == list(range(n))
    assert not np.array_equal(seen[:n], seen[n : 2 * n])  # a new permutation each epoch
    # Resuming at step 13 gives exactly what an uninterrupted run gives at step 13.
    again, _ = batch_indices(13, n, batch, seed=3)
    np.testing.assert_array_equal(again, seen[13 * batch : 14 * batch])
    assert not np.array_equal(batch_indices(13, n, batch, seed=4)[0], again)


def test_process_shards_partition_the_global_batch():
    n, batch, procs = 37, 12, 4
    full, full_flips = batch_indices(5, n, batch, seed=0)
    parts = [
        batch_indices(5, n, batch, seed=0, process_index=p, process_count=procs)
        for p in range(procs)
    ]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), full)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), full_flips)
    with pytest.raises(ValueError, match="not divisible by the 5 processes"):
        batch_indices(0, n, batch, seed=0, process_count=5)


def test_get_batch_flips_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 4, 6, 1)).astype(np.float32)
    labels = np.arange(20, dtype=np.int32)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, labels=labels)
    data = load_npz(path)
    xb, yb = get_batch(data, 2, 10, seed=1, flip=True)
    idx, flips = batch_indices(2, 20, 10, seed=1)
    np.testing.assert_array_equal(yb, labels[idx])
    expected = np.where(flips[:, None, None, None], x[idx][:, :, ::-1], x[idx])
    np.testing.assert_array_equal(xb, expected)
    assert 0 < flips.sum() < len(flips)
    xb2, _ = get_batch(data, 2, 10, seed=1, flip=False)
    np.testing.assert_array_equal(xb2, x[idx])


def test_bad_data_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", images=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"has no array 'x'; it holds \['images'\]"):
        load_npz(tmp_path / "other.npz")
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        ArrayDataset(np.zeros((3, 2), np.float32), np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="flips apply to images"):
        get_batch(ArrayDataset(np.zeros((3, 2), np.float32)), 0, 3, seed=0, flip=True)
