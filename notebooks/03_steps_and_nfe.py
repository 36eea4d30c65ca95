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
# # Quality against network evaluations: 1 step, 2 steps and the teacher's N
#
# A consistency model replaces the teacher's ODE solver by one network evaluation (NFE) or a
# few. On the 8-component ring mixture everything has a ground truth, so quality is the sliced
# Wasserstein-2 distance (SW₂) of samples to fresh data, whose floor at this sample size is the
# distance between two data sets:
#
# * **the teacher**, integrated with EDM's Heun sampler (NFE = 2N − 1) and with Euler / DDIM
#   (NFE = N): the *exact* TrigFlow field of the mixture (`scm_jax.toy.teacher_apply_fn`), and
#   a learned diffusion network (`recipes.pretrain`, the MP-MLP);
# * **an sCD student** distilled from the exact field (`recipes.distill`, started from the learned
#   diffusion network) and **an sCT student** trained from scratch (`scm_jax.toy.fit.fit`),
#   sampled with 1, 2, 3 and 4 steps (`scm_jax.sampling.consistency_times`);
# * **a t_mid sweep** of 2-step sampling: sCM fixes t_mid = 1.1 (reference §4); here is how
#   much that choice matters.

# %%
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

from scm_jax import sampling, trigflow
from scm_jax.networks import build_network
from scm_jax.run.sampler import Sampler
from scm_jax.toy import recipes, sliced_wasserstein, teacher_apply_fn
from scm_jax.toy.fit import fit

# %% tags=["parameters"]
QUICK = False  # True: the short version CI runs (a few steps; the same code and figures)
FIG_DIR = None  # a folder to save the figures as PNG (docs/images/ablations for the docs)
mixture = "ring"  # or "grid" (25 narrow modes)
model = dict(recipes.MLP)  # 4 residual blocks of 128 (the reference toy student)
pretrain_steps = recipes.PRETRAIN_STEPS  # the learned diffusion teacher
scd_steps = 1500
sct_steps = 3000
teacher_steps = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]  # N of the ODE solvers
student_steps = [1, 2, 3, 4]
t_mids = [0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
num_samples = 8192  # samples per SW₂ estimate
seed = 0

# %%
if QUICK:
    model = {**model, "hidden": 16, "depth": 1, "emb_channels": 16}
    pretrain_steps, scd_steps, sct_steps, num_samples = 10, 10, 10, 256
    teacher_steps, student_steps, t_mids = [1, 4], [1, 2], [0.6, 1.1]

plt.rcParams.update({"figure.dpi": 90, "savefig.dpi": 90, "font.size": 8})
SIGMA_D = recipes.SIGMA_D
T_MAX = trigflow.t_max(80.0, SIGMA_D)
mix = recipes.MIXTURES[mixture]()
k_data, k_floor, k_sw = jax.random.split(jax.random.key(1234), 3)
data = mix.sample(k_data, num_samples)
floor = float(sliced_wasserstein(mix.sample(k_floor, num_samples), data, k_sw))


def sw2(x):
    """SW₂ of samples ``x`` (N, 2) to the fixed data set (the same projections every time)."""
    return float(sliced_wasserstein(x, data, k_sw))


def save(fig, name):
    if FIG_DIR is not None:
        Path(FIG_DIR).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIG_DIR) / name)


print(f"{mixture} mixture, data vs data SW₂ (the floor) = {floor:.4f}")

# %% [markdown]
# ## The teacher's ODE
#
# `scm_jax.sampling.sample_ode` integrates dx_t/dt = σ_d F from t_max on EDM's ρ = 7 time grid.
# The exact field makes the solver's discretisation error the only error; the learned network
# adds its own.

# %%
exact = teacher_apply_fn(mix, SIGMA_D)
teacher_nd = build_network(model)
teacher_params = recipes.pretrain(model, mixture, steps=pretrain_steps, seed=100)
learned = Sampler(
    teacher_nd, teacher_params, sigma_d=SIGMA_D, objective="diffusion", batch_size=num_samples
)
ode = {}  # (teacher, solver) -> list of (nfe, SW₂)
for solver in ("heun", "euler"):
    run = jax.jit(
        lambda key, n, solver=solver: sampling.sample_ode(
            exact, None, key, (num_samples, 2), n, SIGMA_D, solver=solver
        )[0],
        static_argnums=1,
    )
    ode["exact", solver] = [
        (sampling.ode_nfe(n, solver), sw2(run(jax.random.key(seed), n))) for n in teacher_steps
    ]
ode["learned", "heun"] = [
    (learned.nfe(n), sw2(learned.sample(seed, num_samples, steps=n))) for n in teacher_steps
]
for (who, solver), rows in ode.items():
    print(f"{who:7s} teacher, {solver:5s}: " + "  ".join(f"{n}:{s:.4f}" for n, s in rows))

# %% [markdown]
# Heun's method with N = 2 (NFE 3) is far worse than with N = 1: its one corrected step goes
# from σ = 80 to σ_min = 0.002 and averages the slope there, (x_σ − D(x_σ))/σ ≈ 0 at so small a
# σ, with the slope at σ = 80, so it covers only half the way and the sample is left at noise
# level σ ≈ 40 (EDM's sampler needs enough steps for its correction to be small).

# %% [markdown]
# ## The students
#
# Both are the same MP-MLP. sCD distils the exact field from the learned diffusion network's
# weights (`recipes.distill('scd', ...)`, sCM's settings: tangent normalisation, warm-up over a
# sixth of training, adaptive weighting); sCT trains from scratch on the data alone.

# %%
student_nd = build_network(model)
_, scd = recipes.distill("scd", teacher_params, model, mixture, steps=scd_steps, seed=seed)
sct = fit(
    "sct",
    student_nd,
    mix,
    jax.random.key(seed),
    steps=sct_steps,
    warmup_steps=sct_steps // 6,
    ema_halflife_steps=sct_steps / 20,
    chunk=250,
    **recipes.FIT,
)
students = {
    name: Sampler(student_nd, res.ema_params["net"], sigma_d=SIGMA_D, batch_size=num_samples)
    for name, res in (("sCD", scd), ("sCT", sct))
}
cm = {
    name: [(n, sw2(s.sample(seed, num_samples, steps=n))) for n in student_steps]
    for name, s in students.items()
}
for name, rows in cm.items():
    print(f"{name}: " + "  ".join(f"{n} steps {s:.4f}" for n, s in rows))

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1.3, 1]})
styles = {("exact", "heun"): "o-", ("exact", "euler"): "s--", ("learned", "heun"): "^-"}
for (who, solver), rows in ode.items():
    n, s = np.array(rows).T
    ax[0].loglog(n, s, styles[who, solver], ms=3, label=f"{who} teacher, {solver}")
for i, (name, rows) in enumerate(cm.items()):
    n, s = np.array(rows).T
    ax[0].loglog(n, s, "D-", color=f"C{3 + i}", ms=4, lw=1.5, label=f"{name} student")
ax[0].axhline(floor, color="k", lw=0.7, ls=":", label="data vs data")
ax[0].set(xlabel="network evaluations (NFE)", ylabel="SW₂ to data", title="quality against NFE")
ax[0].legend(fontsize=7)

# Samples at a few budgets: the exact teacher's Heun ODE against the sCD student.
panels = [("teacher, Heun, NFE 7", None, 4), ("teacher, Heun, NFE 31", None, 16)]
panels += [(f"sCD, {n} step{'s' * (n > 1)}", "sCD", n) for n in (1, 2)]
ax[1].axis("off")
inner = ax[1].get_gridspec()[1].subgridspec(2, 2, wspace=0.05, hspace=0.25)
lim = 1.3 * float(np.abs(np.asarray(data)).max())
heun = jax.jit(
    lambda key, n: sampling.sample_ode(exact, None, key, (2000, 2), n, SIGMA_D)[0],
    static_argnums=1,
)
for j, (title, who, n) in enumerate(panels):
    a = fig.add_subplot(inner[j // 2, j % 2])
    x = heun(jax.random.key(seed), n) if who is None else students[who].sample(seed, 2000, n)
    a.scatter(*np.asarray(data[:2000]).T, s=1, c="0.8")
    a.scatter(*np.asarray(x).T, s=1, c="C3")
    a.set(xticks=[], yticks=[], aspect="equal", title=title, xlim=(-lim, lim), ylim=(-lim, lim))
    a.title.set_fontsize(7)
fig.tight_layout()
save(fig, "03_quality_vs_nfe.png")

# %% [markdown]
# ## Where the second step starts: t_mid
#
# 2-step sampling maps noise to x̂₀ = f(z, t_max), re-noises it to t_mid
# (x = cos t_mid·x̂₀ + sin t_mid·z′) and maps once more. Small t_mid keeps most of the first
# sample (the second step can only sharpen it); t_mid near t_max throws it away (the second step
# is another 1-step sample).

# %%
sweep = {}
for name, s in students.items():
    sweep[name] = []
    for t_mid in t_mids:
        s2 = Sampler(s.nd, s.params, sigma_d=SIGMA_D, t_mid=t_mid, batch_size=num_samples)
        sweep[name].append(sw2(s2.sample(seed, num_samples, steps=2)))
    best = int(np.argmin(sweep[name]))
    print(
        f"{name}: best t_mid {t_mids[best]} (SW₂ {sweep[name][best]:.4f}); "
        + "  ".join(f"{t}:{v:.4f}" for t, v in zip(t_mids, sweep[name], strict=True))
    )

fig, ax = plt.subplots(figsize=(5, 3))
for i, (name, values) in enumerate(sweep.items()):
    ax.plot(t_mids, values, "o-", color=f"C{3 + i}", ms=3, label=f"{name}, 2 steps")
    ax.axhline(cm[name][0][1], color=f"C{3 + i}", lw=0.7, ls="--", label=f"{name}, 1 step")
ax.axhline(floor, color="k", lw=0.7, ls=":", label="data vs data")
ax.axvline(1.1, color="0.5", lw=0.6)
ax.text(1.1, ax.get_ylim()[1], " sCM's 1.1", va="top", fontsize=7)
ax.set(xlabel="t_mid", ylabel="SW₂ to data", title=f"2-step sampling on the {mixture} mixture")
ax.legend(fontsize=7)
fig.tight_layout()
save(fig, "03_t_mid_sweep.png")

# %% [markdown]
# The numbers of the full run, and what they say, are in docs/ablations.md.
