# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # TrigFlow and its tangents
#
# The noise process of sCM, x_t = cos t·x0 + sin t·z with z ~ N(0, σ_d²I) and t ∈ [0, π/2]
# (reference §1), how it maps onto EDM, VP and rectified flow, and the paper's Eq. 7 analysis:
# why the time derivative ∂_t F of the network blows up near t = π/2 with EDM's
# c_noise = ¼ ln(σ_d tan t) and Fourier features of a large scale, and stays bounded with
# c_noise(t) = t and positional embeddings.
#
# Everything here comes from the public API: `scm_jax.trigflow` (the schedule and the
# conversions), `scm_jax.toy` (a Gaussian mixture with its exact TrigFlow teacher and flow map),
# `scm_jax.networks.build_network` and `scm_jax.losses.tangent_jvp` (the JVP the sCT / sCD
# losses take).

# %%
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from scm_jax import trigflow
from scm_jax.losses import tangent_jvp
from scm_jax.networks import build_network
from scm_jax.networks.embeddings import c_noise
from scm_jax.toy import flow_map, ring_mixture, teacher_apply_fn, velocity
from scm_jax.toy.fit import fit

# %% tags=["parameters"]
QUICK = False  # True: the short version CI runs (a few steps; the same code and figures)
FIG_DIR = None  # a folder to save the figures as PNG (docs/images/ablations for the docs)
sigma_d = 0.5
train_steps = 600  # diffusion steps of each small network before its tangent is measured
num_points = 512  # noisy samples per time in the tangent measurement
num_times = 96  # times on the grid in (0, t_max]
seed = 0

# %%
if QUICK:
    train_steps, num_points, num_times = 10, 64, 16

plt.rcParams.update({"figure.dpi": 90, "savefig.dpi": 90, "font.size": 9})
T_MAX = trigflow.t_max(80.0, sigma_d)  # sampling starts at sigma_max = 80: 1.5646
T_MID = 1.1  # sCM's second time for 2-step sampling
print(f"t_max = {T_MAX:.5f}, 1 / cos(t_max) = {1 / math.cos(T_MAX):.1f}")


def save(fig, name):
    """Write ``fig`` to FIG_DIR/name (when FIG_DIR is set)."""
    if FIG_DIR is not None:
        Path(FIG_DIR).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIG_DIR) / name)


# %% [markdown]
# ## The schedule and its conversions
#
# TrigFlow's α_t = cos t and σ_t = sin t keep x_t at variance σ_d² at every t (for data of std
# σ_d). The same noisy sample is an EDM state x_σ = x_t / cos t at σ = σ_d tan t, a VP state of
# the same signal-to-noise ratio, and a rectified-flow state at s = sin t / (sin t + cos t).
# The sCM training times come from a log-normal proposal on σ: t = arctan(e^τ / σ_d),
# τ ~ N(P_mean, P_std²).

# %%
t = np.linspace(1e-3, math.pi / 2 - 1e-3, 400)
alpha_vp, sigma_vp = (np.asarray(a) for a in trigflow.vp_alpha_sigma_from_t(t, sigma_d))
t_draws = np.asarray(
    trigflow.sample_t_lognormal(jax.random.key(seed), (20000,), -1.0, 1.6, sigma_d)
)
fig, ax = plt.subplots(1, 3, figsize=(11, 3.1))
ax[0].plot(t, np.cos(t), label="α_t = cos t")
ax[0].plot(t, np.sin(t), label="σ_t = sin t")
ax[0].plot(t, np.asarray(trigflow.rf_time_from_t(t)), "--", label="rectified-flow time s")
ax[0].plot(t, sigma_vp, ":", label="VP σ' (same SNR)")
ax[0].set(xlabel="TrigFlow time t", title="coefficients")
ax[1].semilogy(t, np.asarray(trigflow.sigma_from_t(t, sigma_d)), label="EDM σ = σ_d tan t")
ax[1].semilogy(t, (alpha_vp / sigma_vp) ** 2, "--", label="SNR α'²/σ'² = (σ_d/σ)²")
ax[1].set(xlabel="t", title="noise level")
ax2 = ax[1].twinx()
ax2.hist(t_draws, bins=60, density=True, color="0.88", zorder=0)
ax2.set(ylabel="sCM proposal density (−1.0, 1.6)")
ax[1].set_zorder(ax2.get_zorder() + 1)
ax[1].patch.set_visible(False)
for a in ax[:2]:
    for tt, name in ((T_MAX, "t_max"), (T_MID, "t_mid")):
        a.axvline(tt, color="k", lw=0.6, ls=":")
        a.text(tt, a.get_ylim()[1], name, ha="right", va="top", fontsize=7, rotation=90)
    a.legend(fontsize=7, loc="center left")

# The exact PF-ODE of the 8-component ring: paths from noise at t_max to data at t = 0
# (one flow_map call: every point carries its own end time).
mix = ring_mixture()
num_paths, path_times = 48, np.linspace(T_MAX, 0.0, 40)
z = trigflow.sample_noise(jax.random.key(seed + 1), (num_paths, 2), sigma_d)
ends = np.repeat(path_times, num_paths)
paths = flow_map(mix, jnp.tile(z, (len(path_times), 1)), T_MAX, ends, sigma_d, num_steps=100)
paths = np.asarray(paths).reshape(len(path_times), num_paths, 2)
ax[2].scatter(*np.asarray(mix.sample(jax.random.key(seed), 3000)).T, s=1, c="0.75")
ax[2].plot(paths[:, :, 0], paths[:, :, 1], lw=0.6, alpha=0.8)
ax[2].scatter(*paths[0].T, s=6, c="k", marker="x", lw=0.6, label="noise at t_max")
ax[2].scatter(*paths[-1].T, s=8, c="C3", label="sample at t = 0")
ax[2].set(aspect="equal", title="exact PF-ODE paths, ring mixture", xlim=(-1.6, 1.6))
ax[2].legend(fontsize=7, loc="upper right")
fig.tight_layout()
save(fig, "01_schedule.png")

# %% [markdown]
# The conversions agree on the exact teacher: EDM's denoiser D = c_skip·x_σ + c_out·F_EDM with
# F_EDM = −F equals TrigFlow's cos t·x_t − σ_d sin t·F; the VP ε-prediction and the flow-matching
# velocity map back to the same F.

# %%
x0 = mix.sample(jax.random.key(2), 256)
zz = trigflow.sample_noise(jax.random.key(3), x0.shape, sigma_d)
tt = jnp.linspace(0.05, 1.5, 256)
x_t = trigflow.add_noise(x0, zz, tt)
F = teacher_apply_fn(mix, sigma_d)(None, x_t / sigma_d, tt)
# EDM: x_sigma = x_t / cos t; D_EDM(x_sigma) = c_skip x_sigma + c_out F_EDM with EDM's c_skip, c_out
sigma = trigflow.sigma_from_t(tt, sigma_d)[:, None]
x_sigma = trigflow.edm_from_xt(x_t, tt)
c_skip = sigma_d**2 / (sigma**2 + sigma_d**2)
c_out = sigma * sigma_d / jnp.sqrt(sigma**2 + sigma_d**2)
D_edm = c_skip * x_sigma + c_out * trigflow.edm_from_F(F)
checks = {
    "EDM denoiser vs TrigFlow denoiser": D_edm - trigflow.denoiser(x_t, tt, F, sigma_d),
    "x_t -> EDM -> x_t": trigflow.xt_from_edm(x_sigma, sigma[:, 0], sigma_d) - x_t,
}
eps = trigflow.eps_from_F(x_t, tt, F, sigma_d)
checks["F -> eps (VP) -> F"] = trigflow.F_from_eps(x_t, tt, eps, sigma_d) - F
s_rf = trigflow.rf_time_from_t(tt)
x_fm = trigflow.rf_from_xt(x_t, tt, sigma_d)
checks["F -> flow-matching velocity -> F"] = (
    trigflow.F_from_rf_velocity(x_fm, s_rf, trigflow.rf_velocity_from_F(x_fm, s_rf, F)) - F
)
for name, err in checks.items():
    print(f"{name:36s} max |error| = {float(jnp.abs(err).max()):.1e}")

# %% [markdown]
# ## Eq. 7: where the tangent blows up
#
# The sCM target contains df/dt, and in it the time derivative of the network
# sin t·∂_t F = sin t·(∂F/∂emb)·(∂emb/∂c_noise)·(∂c_noise/∂t) (reference §2.2). The last factor
# is the time conditioning's: with EDM's c_noise = ¼ ln(σ_d tan t), sin t·∂_t c_noise =
# 1/(4 cos t), which diverges as t → π/2 (at t_max it is 40); with c_noise = t it is sin t ≤ 1.
# The middle factor carries the embedding's frequency: Fourier features sin(2π s ω c + φ) have a
# derivative proportional to the scale s. The loss multiplies df/dt by cos t (the prior weight),
# so the term that enters the target is cos t·sin t·σ_d ∂_t F, computed directly by the JVP
# (`tangent_jvp`, the paper's rearrangement).

# %%
tg = np.linspace(0.02, T_MAX, 400)
fig, ax = plt.subplots(1, 2, figsize=(8, 3))
dc_edm = np.asarray(jax.vmap(jax.grad(lambda s: c_noise(s[None], "edm", sigma_d)[0]))(tg))
ax[0].semilogy(tg, np.sin(tg) * 1.0, label="c_noise = t (sCM)")
ax[0].semilogy(tg, np.sin(tg) * dc_edm, label="c_noise = ¼ ln(σ_d tan t) (EDM)")
ax[0].semilogy(tg, 1 / (4 * np.cos(tg)), "k:", lw=0.8, label="1 / (4 cos t)")
ax[0].set(xlabel="t", title="sin t · ∂c_noise/∂t  (Eq. 7)")
ax[1].semilogy(tg, np.cos(tg) * np.sin(tg), label="c_noise = t")
ax[1].semilogy(tg, np.cos(tg) * np.sin(tg) * dc_edm, label="EDM")
ax[1].set(
    xlabel="t", title="cos t · sin t · ∂c_noise/∂t  (as weighted in the loss)", ylim=(1e-3, 2)
)
for a in ax:
    a.axvline(T_MAX, color="k", lw=0.6, ls=":")
    a.legend(fontsize=7)
fig.tight_layout()
save(fig, "01_eq7_analytic.png")

# %% [markdown]
# The same, measured on networks: four small MP-MLPs that differ only in their time
# conditioning, each trained `train_steps` diffusion steps on the ring (an untrained MP network
# outputs F ≡ 0), then differentiated with `jax.jvp`:
#
# * **∂_t F** alone (tangent 1 in t, 0 in x): the Eq. 7 term sin t·σ_d ∂_t F;
# * **the JVP of the loss**: J = σ_d cos t sin t·dF/dt along the exact PF-ODE velocity
#   (`tangent_jvp` with the exact teacher's dx_t/dt, as sCD computes it).
#
# Each curve is the RMS over `num_points` noisy samples x_t of the mixture at that t.

# %%
ARMS = {
    "positional, c_noise = t (sCM)": {"time_embedding": "positional"},
    "Fourier s = 1, c_noise = t": {"time_embedding": "fourier"},
    "Fourier s = 16, c_noise = t": {"time_embedding": "fourier", "c_noise_scale": 16.0},
    "Fourier, EDM c_noise (stock EDM2)": {"time_embedding": "fourier", "c_noise_mode": "edm"},
}
if QUICK:  # the two ends: sCM's conditioning and stock EDM2's
    ARMS = {k: ARMS[k] for k in list(ARMS)[::3]}
MLP = {
    "arch": "mlp",
    "data_dim": 2,
    "hidden": 64,
    "depth": 2,
    "emb_channels": 64,
    "sigma_d": sigma_d,
}
t_grid = jnp.linspace(0.02, T_MAX, num_times)
x0 = mix.sample(jax.random.key(4), num_points)
zz = trigflow.sample_noise(jax.random.key(5), x0.shape, sigma_d)


def rms(a):
    return jnp.sqrt(jnp.mean(a**2))


def tangent_curves(nd, params):
    """RMS of sin t σ_d ∂_t F and of J = σ_d cos t sin t dF/dt at every time of the grid."""

    @jax.jit
    def at(t1):
        t = jnp.full((num_points,), t1)
        x_t = trigflow.add_noise(x0, zz, t)
        _, dF_dt = jax.jvp(
            lambda s: nd.apply_fn(params, x_t / sigma_d, s), (t,), (jnp.ones_like(t),)
        )
        dx_dt = velocity(mix, x_t, t, sigma_d)
        _, J = tangent_jvp(nd.apply_fn, params, x_t, t, dx_dt, sigma_d=sigma_d)
        return rms(jnp.sin(t1) * sigma_d * dF_dt), rms(J)

    return np.asarray(jax.lax.map(at, t_grid))


curves = {}
for name, options in ARMS.items():
    nd = build_network({**MLP, **options})
    res = fit(
        "diffusion",
        nd,
        mix,
        jax.random.key(seed),
        sigma_d=sigma_d,
        steps=train_steps,
        batch_size=256,
        lr=2e-3,
        P_mean=-0.8,
        P_std=1.6,
        chunk=200,
    )
    curves[name] = tangent_curves(nd, res.ema_params["net"])
    print(
        f"{name:36s} sin t σ_d ∂_tF at t_max: {curves[name][0][-1]:9.3f}   "
        f"J at t_max: {curves[name][1][-1]:.4f}"
    )

fig, ax = plt.subplots(1, 2, figsize=(9, 3.2), sharex=True)
for name, (eq7, J) in curves.items():
    ax[0].semilogy(t_grid, eq7, label=name)
    ax[1].semilogy(t_grid, J, label=name)
ax[0].set(xlabel="t", title="RMS of sin t · σ_d ∂_t F  (Eq. 7's term)")
ax[1].set(xlabel="t", title="RMS of J = σ_d cos t sin t · dF/dt  (the loss's JVP)")
for a in ax:
    a.axvline(T_MAX, color="k", lw=0.6, ls=":")
ax[0].legend(fontsize=7)
fig.tight_layout()
save(fig, "01_eq7_measured.png")

# %% [markdown]
# Reading the figures: with EDM's c_noise the Eq. 7 term grows like 1/cos t towards t_max
# (the noisiest times, where every sample starts), and the Fourier scale multiplies the whole
# curve; the positional embedding of c_noise = t stays the smallest and flat. After the cos t
# weighting of the loss (right), EDM's time map contributes a bounded ¼ (∂F/∂c_noise), so what
# remains is the embedding's frequency: the tangent the loss sees is largest for Fourier s = 16.
# docs/ablations.md compares this with the paper's analysis.
