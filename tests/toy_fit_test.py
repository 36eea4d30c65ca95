"""The toy fitting loops' diagnostics and options (fast tier): per-step history, the fixed-weight
ablation, short runs, AdaGN training, the recipes' distillation entry point, and the 1-NN label
agreement score used next to them in the ablation notebooks."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from scm_jax import gmm
from scm_jax.eval.nearest_neighbor import nn_label_agreement
from scm_jax.networks import build_network
from scm_jax.toy import recipes
from scm_jax.toy.fit import fit

TINY = {"arch": "mlp", "data_dim": 2, "hidden": 8, "depth": 1, "emb_channels": 8,
        "weight_channels": 8, "sigma_d": 0.5}  # fmt: skip


@pytest.mark.parametrize("modulation", ["adn", "adagn"])
def test_fit_records_history_per_step(modulation):
    nd = build_network({**TINY, "modulation": modulation})
    res = fit("sct", nd, gmm.ring_mixture(), jax.random.key(0), steps=6, chunk=4, batch_size=16,
              warmup_steps=2)  # fmt: skip
    # steps round up to a multiple of the chunk: 2 chunks of 4
    assert res.losses.shape == (8,)
    keys = {"grad_norm", "tangent_norm", "tangent_norm_max", "nonfinite", "mse", "w_mean"}
    assert set(res.history) == keys
    for v in res.history.values():
        assert v.shape == (8,) and bool(np.all(np.isfinite(v)))
    assert float(res.history["grad_norm"].min()) > 0
    assert float(np.abs(res.history["w_mean"]).max()) > 0  # w_phi is learned by default
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), res.params, nd.init(
        jax.random.split(jax.random.key(0))[0]))  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 0  # a real update happened


def test_fit_without_adaptive_weighting_and_short_runs():
    nd = build_network(TINY)
    init = nd.init(jax.random.key(1))
    res = fit("sct", nd, gmm.ring_mixture(), jax.random.key(0), steps=3, batch_size=16,
              params=init, adaptive_weighting=False)  # fmt: skip
    assert res.losses.shape == (3,)  # fewer steps than the default chunk: exactly 3
    np.testing.assert_array_equal(res.history["w_mean"], 0.0)
    # no w_phi in the loss: the weighting head gets no gradient and stays where it started
    np.testing.assert_array_equal(
        jax.tree.leaves(res.params["weight"])[0], jax.tree.leaves(init["weight"])[0]
    )
    diff = fit("diffusion", nd, gmm.ring_mixture(), jax.random.key(0), steps=2, batch_size=16)
    assert set(diff.history) == {"grad_norm"}


def test_recipes_distill_returns_the_student_and_its_history():
    nd, res = recipes.distill("scd", None, TINY, "ring", steps=2)
    assert nd.sample_shape == (2,) and res.losses.shape == (2,)  # one chunk of exactly 2
    assert {"grad_norm", "tangent_norm", "learning_rate"} <= set(res.history)
    assert recipes.distill_options("rcm", 60)["dmd"]["start_step"] == 10


def test_nn_label_agreement_known_answer():
    ref_x = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    ref_y = np.array([0, 1, 2])
    x = np.array([[1.0, 0.0], [9.0, 1.0], [0.0, 8.0], [6.0, 0.0]])
    labels = np.array([0, 1, 1, 1])  # right, right, wrong (nearest is class 2), right
    assert nn_label_agreement(x, labels, ref_x, ref_y, chunk=3) == 0.75
    with pytest.raises(ValueError, match="differ in size"):
        nn_label_agreement(x, labels, np.zeros((3, 3)), ref_y)
