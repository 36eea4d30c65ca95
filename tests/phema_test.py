"""EDM2 post-hoc EMA: the exact discrete profiles and their inner products, the least-squares
reconstruction (a stored profile comes back as its snapshot; a polynomial trajectory's EMA of an
intermediate sigma_rel matches the one tracked directly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import ema, phema

STORED = (0.05, 0.10)


def brute_profiles(gammas, steps) -> np.ndarray:
    """(N, max step) matrix of the discrete profiles, written out with step_profile."""
    out = np.zeros((len(gammas), max(steps)))
    for i, (g, s) in enumerate(zip(gammas, steps, strict=True)):
        out[i, :s] = phema.step_profile(g, s)
    return out


# ----------------------------------------------------------------------------------- the math


def test_inner_products_are_exact_and_tend_to_edm2_closed_form():
    gammas = [ema.power_exponent(s) for s in (0.03, *STORED, 0.2)]
    steps = [1, 3, 10, 17, 40]
    g, s = np.repeat(gammas, len(steps)), np.tile(steps, len(gammas))
    W = brute_profiles(g, s)
    np.testing.assert_allclose(W.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(phema.inner_products(g, s, g, s), W @ W.T, rtol=1e-10, atol=1e-15)
    # Against EDM2's continuous profile: each step's weight is its integral over the step.
    t = np.linspace(0, 40, 40 * 200 + 1)
    p = phema.continuous_profile(gammas[1], t, 40.0)
    per_step = [np.trapezoid(p[k * 200 : (k + 1) * 200 + 1], t[k * 200 : (k + 1) * 200 + 1])
                for k in range(40)]  # fmt: skip
    np.testing.assert_allclose(per_step, phema.step_profile(gammas[1], 40), atol=2e-6)
    # Long runs: the discrete inner products / batch -> the closed form (EDM2 Eq. 151).
    batch, long_steps = 4, np.tile([20_000, 50_000, 100_000], 2)
    gl = np.repeat(gammas[1:3], 3)
    exact = phema.inner_products(gl, long_steps, gl, long_steps) / batch
    closed = phema.continuous_inner_products(gl, batch * long_steps, gl, batch * long_steps)
    np.testing.assert_allclose(exact, closed, rtol=1e-4)


def test_stored_profile_solves_to_one_hot():
    """A stored profile at a stored time: the coefficients are that snapshot's, exactly;
    other widths at snapshot times are reconstructed with small profile errors."""
    steps = [10, 20, 30, 40, 50]
    sig, st = np.repeat(STORED, len(steps)), np.tile(steps, len(STORED))
    sol = phema.solve_coefficients(sig, st, [0.10, 0.05], [30, 50])
    onehot = np.zeros((len(sig), 2))
    onehot[len(steps) + 2, 0] = onehot[len(steps) - 1, 1] = 1.0
    np.testing.assert_allclose(sol.coefficients, onehot, atol=1e-8)
    assert np.all(sol.error < 1e-6)
    sol = phema.solve_coefficients(sig, st, [0.07, 0.08], [50, 40])
    np.testing.assert_allclose(sol.coefficients.sum(0), 1.0)
    assert np.all(sol.error < 0.03) and np.all(sol.error > 1e-4)  # approximations, not exact
    g = [ema.power_exponent(s) for s in (*sig, 0.07)]
    W = brute_profiles(g, [*st, 50])
    resid = W[-1] - sol.coefficients[:, 0] @ W[:-1]
    assert np.linalg.norm(resid) / np.linalg.norm(W[-1]) == pytest.approx(sol.error[0], rel=1e-6)


def test_polynomial_trajectory_matches_the_directly_tracked_ema():
    """theta(n) = (1, u, u^2, u^3, sin 3u), u = n / N, through the real update_emas with the
    stored profiles and sigma_rel 0.075 tracked directly; the reconstruction of 0.075 from
    snapshots of 0.05 and 0.10 every 10 steps matches it (and the exact discrete profile applied
    to theta), 1000 x closer than either stored EMA is."""
    batch, steps, every, target = 4, 200, 10, 0.075
    power_std = (*STORED, target)
    n_total = steps * batch

    def theta(n):
        u = jnp.float32(n) / n_total
        return {"w": jnp.stack([1.0 + 0 * u, u, u**2, u**3, jnp.sin(3 * u)])}

    emas = ema.init_emas(theta(0), power_std, 0.0)
    update = jax.jit(lambda e, p, n: ema.update_emas(e, p, n, batch, power_std, 0.0))
    snaps, history = [], []
    for k in range(1, steps + 1):
        params = theta(k * batch)
        history.append(np.asarray(params["w"], np.float64))
        emas = update(emas, params, jnp.float32(k * batch))
        if k % every == 0:
            snaps += [(k, s, np.asarray(emas[f"power_{s:.3f}"]["w"])) for s in STORED]
    direct = np.asarray(emas[f"power_{target:.3f}"]["w"])
    exact = phema.step_profile(ema.power_exponent(target), steps) @ np.stack(history)
    np.testing.assert_allclose(direct, exact, atol=5e-7)  # float32 updates vs the profile
    sol = phema.solve_coefficients([s for _, s, _ in snaps], [k for k, _, _ in snaps], [target],
                                   [steps])  # fmt: skip
    rec = phema.weighted_sum([w for _, _, w in snaps], sol.coefficients[:, 0])
    assert rec.dtype == np.float32 and rec.shape == (5,)
    np.testing.assert_allclose(rec, direct, atol=4e-5)
    for s in STORED:
        assert np.abs(snaps[-1 if s == STORED[1] else -2][2] - direct).max() > 0.05


def test_weighted_sum_of_trees():
    trees = [{"a": np.full(3, float(i), np.float32), "b": {"c": np.ones((2,), np.float32) * i}}
             for i in range(1, 4)]  # fmt: skip
    out = phema.weighted_sum(trees, [0.5, -1.0, 1.5])
    np.testing.assert_allclose(out["a"], 0.5 - 2 + 4.5)
    assert out["b"]["c"].dtype == np.float32
    with pytest.raises(ValueError, match="3 trees but 2 coefficients"):
        phema.weighted_sum(trees, [1.0, 0.0])
