"""Training metrics: averaging over steps, jitted merge, time bins with empty entries."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.train import metrics as tm

_merge = jax.jit(lambda a, b: a.merge(b))


def _structure(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def test_average_over_steps_matches_numpy_mean():
    rng = np.random.default_rng(0)
    loss, grad, tn, tmax = (rng.normal(size=5).astype(np.float32) for _ in range(4))
    lr = np.linspace(1e-3, 2e-3, 5, dtype=np.float32)
    bins = rng.normal(size=(5, 4)).astype(np.float32)
    make = jax.jit(lambda **k: tm.make_step_metrics(**k))
    acc = tm.empty_metrics()
    for i in range(5):
        step = make(
            loss=loss[i],
            grad_norm=grad[i],
            tangent_norm=tn[i],
            tangent_norm_max=tmax[i],
            learning_rate=lr[i],
            loss_per_time_bin=bins[i],
        )
        acc = _merge(acc, step)
    s = tm.summarize(acc)
    np.testing.assert_allclose(s["loss"], loss.mean(), rtol=1e-6)
    np.testing.assert_allclose(s["grad_norm"], grad.mean(), rtol=1e-6)
    np.testing.assert_allclose(s["tangent_norm"], tn.mean(), rtol=1e-6)
    np.testing.assert_allclose(s["tangent_norm_max"], tmax.max(), rtol=1e-6)
    np.testing.assert_allclose(s["learning_rate"], lr[-1], rtol=1e-6)
    for k in range(4):
        np.testing.assert_allclose(s[f"loss/t_bin{k}"], bins[:, k].mean(), rtol=1e-5)
    assert all(isinstance(v, float) for v in s.values())
    # Names not given are not reported (no zeros).
    assert "mse" not in s and "warmup_r" not in s and "nonfinite_steps" not in s


def test_jitted_merge_keeps_structure_and_is_associative():
    a = tm.make_step_metrics(loss=1.0, mse=0.5, loss_per_time_bin=jnp.arange(4.0))
    b = tm.make_step_metrics(loss=3.0, mse=1.5, loss_per_time_bin=jnp.arange(4.0) + 2)
    c = tm.make_step_metrics(loss=5.0, mse=2.5, loss_per_time_bin=jnp.arange(4.0) + 4)
    e = tm.empty_metrics()
    # Same pytree structure and dtypes as the empty state: usable as a jit / scan carry.
    assert _structure(e) == _structure(a)
    left = tm.summarize(_merge(_merge(a, b), c))
    right = tm.summarize(_merge(a, _merge(b, c)))
    assert left == pytest.approx(right)
    assert left["loss"] == pytest.approx(3.0) and left["mse"] == pytest.approx(1.5)
    assert tm.summarize(_merge(e, a)) == pytest.approx(tm.summarize(a))

    def body(carry, x):
        return carry.merge(tm.make_step_metrics(loss=x)), None

    scanned, _ = jax.lax.scan(body, e, jnp.arange(6.0))
    assert tm.summarize(scanned)["loss"] == pytest.approx(2.5)


def test_vector_bins_with_empty_entries():
    # NaN marks an empty bin; explicit counts weight the bins by their sample numbers.
    a = tm.make_step_metrics(loss_per_time_bin=jnp.array([1.0, jnp.nan, 3.0, jnp.nan]))
    b = tm.make_step_metrics(loss_per_time_bin=jnp.array([3.0, 2.0, 5.0, jnp.nan]))
    s = tm.summarize(_merge(a, b))
    assert s == pytest.approx({"loss/t_bin0": 2.0, "loss/t_bin1": 2.0, "loss/t_bin2": 4.0})
    c = tm.make_step_metrics(
        loss_per_time_bin=jnp.array([0.0, 4.0, 1.0, 7.0]),
        loss_per_time_bin_count=jnp.array([0, 3, 1, 2]),
    )
    d = tm.make_step_metrics(
        loss_per_time_bin=jnp.array([2.0, 0.0, 3.0, 1.0]),
        loss_per_time_bin_count=jnp.array([2, 1, 1, 0]),
    )
    s = tm.summarize(_merge(c, d))
    assert s == pytest.approx({"loss/t_bin0": 2.0, "loss/t_bin1": 3.0, "loss/t_bin2": 2.0,
                               "loss/t_bin3": 7.0})  # fmt: skip
    # compute() gives NaN for a bin that stayed empty.
    assert math.isnan(float(a.loss_per_time_bin.compute()[3]))


def test_diffusion_reports_no_tangent_metrics():
    step = tm.make_step_metrics(
        loss=0.3, mse=0.2, w_mean=0.1, grad_norm=1.0, loss_per_time_bin=jnp.ones(4)
    )
    s = tm.summarize(step)
    assert not any(k.startswith(("tangent", "warmup", "nonfinite")) for k in s)
    assert {"loss", "mse", "w_mean", "grad_norm", "loss/t_bin3"} <= set(s)


def test_skipped_step_is_masked_but_counted():
    good = tm.make_step_metrics(loss=1.0, grad_norm=2.0, nonfinite_steps=0, learning_rate=0.1)
    bad = tm.make_step_metrics(
        loss=jnp.nan,
        grad_norm=jnp.inf,
        tangent_norm_max=jnp.nan,
        loss_per_time_bin=jnp.full(4, jnp.nan),
        nonfinite_steps=True,
        learning_rate=0.2,
    )
    s = tm.summarize(_merge(_merge(good, bad), good))
    assert s["loss"] == 1.0 and s["grad_norm"] == 2.0
    assert s["nonfinite_steps"] == pytest.approx(1 / 3)
    assert s["learning_rate"] == pytest.approx(0.1)
    assert "tangent_norm_max" not in s and "loss/t_bin0" not in s


def test_metrics_from_aux_maps_loss_diagnostics():
    aux = {
        "loss_per_time_bin": jnp.arange(4.0),
        "g_norm_mean": 2.0,
        "g_norm_std": 0.5,
        "g_norm_max": 4.0,
        "nonfinite_fraction": 0.25,
        "r": 0.5,
        "w_mean": -0.1,
        "mse": 0.3,
    }
    s = tm.summarize(jax.jit(tm.metrics_from_aux)(jnp.float32(0.7), aux, grad_norm=1.5))
    assert s == pytest.approx(
        {"loss": 0.7, "mse": 0.3, "grad_norm": 1.5, "tangent_norm": 2.0, "tangent_norm_std": 0.5,
         "tangent_norm_max": 4.0, "w_mean": -0.1, "nonfinite": 0.25, "warmup_r": 0.5,
         "loss/t_bin0": 0.0, "loss/t_bin1": 1.0, "loss/t_bin2": 2.0, "loss/t_bin3": 3.0}
    )  # fmt: skip


def test_errors():
    with pytest.raises(TypeError, match="unknown metric"):
        tm.make_step_metrics(los=1.0)
    a = tm.make_step_metrics(loss_per_time_bin=jnp.ones(4))
    b = tm.make_step_metrics(loss_per_time_bin=jnp.ones(8))
    with pytest.raises(ValueError, match="time-bin"):
        a.merge(b)
    assert tm.empty_metrics(8).merge(b).loss_per_time_bin.totals.shape == (8,)
