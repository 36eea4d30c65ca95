"""Optimiser construction and the EDM2 learning-rate schedule in images."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scm_jax.optim import learning_rate, make_optimizer


def test_edm2_schedule():
    ref = 70_000 * 2048
    assert float(learning_rate(0.5 * ref, 1e-2, ref)) == pytest.approx(1e-2)
    assert float(learning_rate(4 * ref, 1e-2, ref)) == pytest.approx(5e-3)
    assert float(learning_rate(2.5e6, 1e-2, 0, 10e6)) == pytest.approx(2.5e-3)
    assert float(learning_rate(1e9, 1e-4)) == pytest.approx(1e-4)  # constant


@pytest.mark.parametrize("name", ["adam", "radam"])
def test_optimizers_step_and_schedule_counts_images(name):
    tx, schedule = make_optimizer(name, 1e-2, batch_size=512, lr_ref_kimg=1.024)
    assert float(schedule(2)) == pytest.approx(1e-2)  # 1024 images = the reference
    assert float(schedule(8)) == pytest.approx(5e-3)  # 4096 images
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, state, params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_gradient_clipping():
    tx, _ = make_optimizer("adam", 1.0, batch_size=1, grad_clip=1.0, b1=0.0, b2=0.0, eps=0.0)
    params = {"w": jnp.zeros(2)}
    clipped = optax.clip_by_global_norm(1.0).update({"w": jnp.array([30.0, 40.0])}, None)[0]
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8], rtol=1e-6)
    updates, _ = tx.update({"w": jnp.array([30.0, 40.0])}, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_bad_optimizer_settings():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd", 1e-3, batch_size=8)
    with pytest.raises(ValueError, match="must be positive"):
        make_optimizer("adam", 0.0, batch_size=8)
