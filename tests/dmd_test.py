"""DMD's generator gradient against the exact reverse-KL direction on Gaussian mixtures, the
student rollouts of DMD / rCM, and the TTUR schedule of the training step (tiny MLP, no data)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax import gmm as gmm_lib
from scm_jax import trigflow
from scm_jax.losses import (
    dmd_direction,
    dmd_generator_loss,
    dmd_loss,
    fixed_rollout_times,
    random_rollout_times,
    sample_num_steps,
    student_rollout,
)
from scm_jax.networks import build_network
from scm_jax.optim import make_optimizer
from scm_jax.sampling import consistency_times
from scm_jax.train.step_dmd import DMDOptions, init_dmd_state, make_dmd_train_step

SIGMA_D = 0.5
T_MAX = trigflow.t_max(80.0, SIGMA_D)


def mixtures():
    """The data law (the ring) and a generator law that differs in weights, radius and width."""
    data = gmm_lib.ring_mixture()
    w = np.array([3, 1, 1, 1, 2, 1, 1, 1], float)
    gen = gmm_lib.GaussianMixture(np.asarray(data.means) * 0.8, np.full(8, 0.2), w / w.sum())
    return data, gen


def test_dmd_gradient_is_the_reverse_kl_score_difference(x64):
    """With a perfect critic (the exact field of the generator's law) and the exact teacher,
    d L_DMD / d x0 = 2 Delta and Delta = (s_fake - s_real) sigma_d^2 sin^2 t / (cos t norm), i.e.
    DMD's reverse-KL direction, with norm = mean|x0 - f_teacher|; in F: -sigma_d sin t dF / norm."""
    data, gen = mixtures()
    fake = gmm_lib.teacher_apply_fn(gen, SIGMA_D)
    real = gmm_lib.teacher_apply_fn(data, SIGMA_D)
    k_x, k_e, k_t = jax.random.split(jax.random.key(0), 3)
    x0 = gen.sample(k_x, 64, jnp.float64)
    eps = trigflow.sample_noise(k_e, x0.shape, SIGMA_D, jnp.float64)
    t = jax.random.uniform(k_t, (64,), jnp.float64, 0.1, 1.5)

    def loss(x0):
        return dmd_generator_loss(fake, None, real, None, x0, eps, t, sigma_d=SIGMA_D,
                                  reduction="sum")[0]  # fmt: skip

    grad = jax.grad(loss)(x0)
    x_t = trigflow.add_noise(x0, eps, t)
    F_fake, F_real = fake(None, x_t / SIGMA_D, t), real(None, x_t / SIGMA_D, t)
    delta, norm = dmd_direction(x0, x_t, t, F_fake, F_real, SIGMA_D)
    np.testing.assert_allclose(grad, 2 * delta / 64, rtol=1e-12, atol=1e-14)
    s, c = jnp.sin(t)[:, None], jnp.cos(t)[:, None]
    f_real = trigflow.denoiser(x_t, t, F_real, SIGMA_D)
    np.testing.assert_allclose(norm, jnp.mean(jnp.abs(x0 - f_real), axis=1), rtol=1e-12)
    score_diff = gmm_lib.score(gen, x_t, t, SIGMA_D) - gmm_lib.score(data, x_t, t, SIGMA_D)
    expected = score_diff * SIGMA_D**2 * s**2 / (c * norm[:, None])
    np.testing.assert_allclose(delta, expected, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(delta, -SIGMA_D * s * (F_fake - F_real) / norm[:, None], rtol=1e-10)
    # The loss value is ||Delta||^2 (sum) or that / D (mean).
    np.testing.assert_allclose(loss(x0), jnp.mean(jnp.sum(delta**2, 1)), rtol=1e-12)
    np.testing.assert_allclose(dmd_loss(x0, delta, "mean"), jnp.sum(delta**2, 1) / 2, rtol=1e-12)


def test_dmd_moves_a_shifted_generator_towards_the_data(x64):
    """Generator x0 = z' + m with a perfect critic: the DMD gradient in m points along m (descent
    moves the generator's law onto the data), and it vanishes when the laws agree."""
    data = gmm_lib.GaussianMixture([[0.0, 0.0]], [0.5], [1.0])
    real = gmm_lib.teacher_apply_fn(data, SIGMA_D)
    k_z, k_e, k_t = jax.random.split(jax.random.key(1), 3)
    z = SIGMA_D * jax.random.normal(k_z, (256, 2), jnp.float64)
    eps = trigflow.sample_noise(k_e, z.shape, SIGMA_D, jnp.float64)
    t = trigflow.sample_t_lognormal(k_t, (256,), -0.69, 1.6, SIGMA_D, jnp.float64)

    def grad_m(m):
        gen = gmm_lib.GaussianMixture([list(np.asarray(m))], [0.5], [1.0])
        fake = gmm_lib.teacher_apply_fn(gen, SIGMA_D)
        loss = lambda m: dmd_generator_loss(fake, None, real, None, z + m, eps, t,
                                            sigma_d=SIGMA_D)[0]  # fmt: skip
        return jax.grad(loss)(m)

    m = jnp.array([0.3, -0.2], jnp.float64)
    g = grad_m(m)
    assert float(g @ m) > 0.9 * float(jnp.linalg.norm(g) * jnp.linalg.norm(m))
    np.testing.assert_allclose(grad_m(jnp.zeros(2, jnp.float64)), 0.0, atol=1e-15)


def test_rollout_times():
    times = random_rollout_times(jax.random.key(0), 512, 4, T_MAX, -0.69, 1.6, SIGMA_D)
    assert times.shape == (4, 512)
    np.testing.assert_allclose(times[0], T_MAX, rtol=1e-6)
    assert bool(jnp.all(times[1:] <= times[:-1])) and bool(jnp.all(times > 0))
    assert float(jnp.mean(times[1] < times[0])) > 0.99  # mostly strictly decreasing
    fixed = fixed_rollout_times(consistency_times(3, T_MAX), 5)
    np.testing.assert_allclose(fixed[:, 0], [T_MAX, 1.1, 0.55], rtol=1e-6)
    assert fixed.shape == (3, 5) and bool(jnp.all(fixed == fixed[:, :1]))
    n = jax.vmap(lambda k: sample_num_steps(k, 4))(jax.random.split(jax.random.key(1), 400))
    assert set(np.asarray(n).tolist()) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        sample_num_steps(jax.random.key(0), 0)


def test_student_rollout_unrolls_the_sampler_with_gradient_through_the_last_step():
    """x0 equals a Python loop of f / re-noising; the gradient is the last step's alone."""

    def apply_fn(p, x_scaled, t, labels=None, guidance=None, key=None):
        return p["a"] * x_scaled + p["b"] * t[:, None]

    params = {"a": jnp.float32(0.7), "b": jnp.float32(-0.3)}
    z = SIGMA_D * jax.random.normal(jax.random.key(2), (6, 3))
    times = random_rollout_times(jax.random.key(3), 6, 4, T_MAX, -0.69, 1.6, SIGMA_D)
    key = jax.random.key(4)

    def f(p, x, t):
        return trigflow.consistency_fn(x, t, apply_fn(p, x / SIGMA_D, t), SIGMA_D)

    run = jax.jit(lambda p, n: student_rollout(apply_fn, p, z, times, n, key, sigma_d=SIGMA_D))
    for n in range(1, 5):
        x = z
        for i in range(n - 1):
            eps = trigflow.sample_noise(jax.random.fold_in(key, i), x.shape, SIGMA_D)
            x = trigflow.add_noise(f(params, x, times[i]), eps, times[i + 1])
        x0, x_last, t_last = run(params, n)
        np.testing.assert_allclose(x_last, x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(t_last, times[n - 1])
        np.testing.assert_allclose(x0, f(params, x, times[n - 1]), rtol=1e-5, atol=1e-6)
        grad = jax.grad(lambda p, n=n: run(p, n)[0].sum())(params)
        want = jax.grad(lambda p, x=x, n=n: f(p, x, times[n - 1]).sum())(params)
        for k in params:
            np.testing.assert_allclose(grad[k], want[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", ["dmd", "rcm"])
def test_ttur_counts_critic_and_generator_updates(objective):
    """k critic updates and one generator update per step; the step counts generator updates
    (rCM with 2-step rollouts; DMD with the regression term); the critic's loop, unrolled or
    not, gives the same state."""
    nd = build_network({"arch": "mlp", "data_dim": 2, "hidden": 16, "depth": 1,
                        "emb_channels": 16, "weight_channels": 16, "sigma_d": SIGMA_D})  # fmt: skip
    k, steps = 3, 2
    tx, schedule = make_optimizer("adam", 1e-3, batch_size=8)
    critic_tx, _ = make_optimizer("adam", 1e-3, batch_size=8 / k)
    options = DMDOptions(critic_updates=k, generator_steps=2, weight=0.01, rollout="random")
    if objective == "dmd":  # with DMD's regression term on a fixed pool of 4 noises
        options = DMDOptions(critic_updates=k, regression_weight=0.25, regression_steps=2,
                             regression_batch=4, regression_pairs=4)  # fmt: skip
    ema = {"power_std": (), "halflife_kimg": 0.1}
    step, looped = (jax.jit(make_dmd_train_step(
        nd, tx, schedule, critic_tx, objective=objective, options=options, sigma_d=SIGMA_D,
        P_mean=-1.0, P_std=1.6, batch_size=8, **ema, unroll_critic=unroll,
        teacher_apply_fn=gmm_lib.teacher_apply_fn(gmm_lib.ring_mixture(), SIGMA_D),
    )) for unroll in (True, False))  # fmt: skip
    state = init_dmd_state(nd, tx, critic_tx, jax.random.key(0), **ema)
    x0 = gmm_lib.ring_mixture().sample(jax.random.key(1), 8)
    in_loop = state
    for _ in range(steps):
        state, values = step(state, x0, None, None)
        in_loop, _ = looped(in_loop, x0, None, None)
    # the unrolled critic updates (the default) are the scanned ones, written out
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(in_loop), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    count = lambda opt: int(opt[0].count)  # Adam's ScaleByAdamState
    assert int(state.step) == steps
    assert count(state.opt_state) == steps and count(state.critic["opt_state"]) == steps * k
    assert float(values["critic_skipped"]) == 0.0 and float(values["nonfinite_steps"]) == 0.0
    assert math.isfinite(float(values["critic_loss"])) and math.isfinite(float(values["loss"]))
    assert ("tangent_norm" in values) == (objective == "rcm")
    assert ("regression_loss" in values) == (objective == "dmd")
