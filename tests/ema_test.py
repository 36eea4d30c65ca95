"""EMA profiles: the power-function EMA's exact weights and width, and the half-life EMA."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import ema


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.2])
def test_power_exponent_inverts_sigma_rel(sigma_rel):
    gamma = ema.power_exponent(sigma_rel)
    assert gamma > 0
    assert ema.power_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)


def test_power_ema_weights_are_the_power_profile():
    """With beta_T = (1 - 1/T)^(gamma+1), the EMA after T unit steps weights step t by
    (t^(gamma+1) - (t-1)^(gamma+1)) / T^(gamma+1): a discretised t^gamma profile, width sigma_rel.
    """
    sigma_rel, T = 0.05, 4000
    gamma = ema.power_exponent(sigma_rel)
    # Track the weight of every step by averaging one-hot vectors.
    avg = np.zeros(T)
    for step in range(1, T + 1):
        beta = float(ema.power_ema_beta(gamma, step, 1))
        onehot = np.zeros(T)
        onehot[step - 1] = 1.0
        avg = beta * avg + (1 - beta) * onehot
    t = np.arange(1, T + 1, dtype=np.float64)
    exact = (t ** (gamma + 1) - (t - 1) ** (gamma + 1)) / T ** (gamma + 1)
    np.testing.assert_allclose(avg, exact, atol=2e-6)
    mean = (avg * t).sum()
    width = np.sqrt((avg * (t - mean) ** 2).sum()) / T
    assert width == pytest.approx(sigma_rel, rel=0.01)


def test_power_ema_counts_images_not_steps():
    """The same images seen give the same beta per image: two half-size steps = one full step."""
    gamma = ema.power_exponent(0.1)
    one = float(ema.power_ema_beta(gamma, 2048, 1024))
    two = float(ema.power_ema_beta(gamma, 1536, 512)) * float(ema.power_ema_beta(gamma, 2048, 512))
    assert one == pytest.approx(two, rel=1e-6)
    assert float(ema.power_ema_beta(gamma, 512, 512)) == 0.0  # the first update copies params


def test_halflife_ema_and_rampup():
    beta = float(ema.halflife_ema_beta(500_000, 512))
    assert beta ** (500_000 / 512) == pytest.approx(0.5, rel=1e-4)
    ramped = float(ema.halflife_ema_beta(500_000, 512, nimg=10_000, rampup=0.05))
    assert ramped == pytest.approx(0.5 ** (512 / 500), rel=1e-6)  # half-life 0.05 * 10k images
    with pytest.raises(ValueError, match="needs the current image count"):
        ema.halflife_ema_beta(1000, 8, rampup=0.1)


def test_tree_helpers():
    params = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2))}}
    emas = ema.init_emas(params, (0.05, 0.1), halflife_kimg=500.0)
    assert sorted(emas) == ["halflife", "power_0.050", "power_0.100"]
    new = {"a": jnp.full(3, 3.0), "b": {"c": jnp.ones((2, 2))}}
    emas = ema.update_emas(emas, new, nimg=8, batch_size=8, power_std=(0.05, 0.1),
                           halflife_kimg=500.0)  # fmt: skip
    np.testing.assert_allclose(emas["power_0.050"]["a"], 3.0)  # first update: beta = 0
    assert 1.0 < float(emas["halflife"]["a"][0]) < 1.01
    with pytest.raises(ValueError, match=r"sigma_rel=0\.5 must be in"):
        ema.power_exponent(0.5)
