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
# # sCD, DMD and rCM: which modes do the students keep?
#
# Three ways to distil a few-step generator from a diffusion teacher (reference §5, docs/method.md):
#
# * **sCD**, continuous-time consistency distillation: the student follows the teacher's PF-ODE,
#   so it inherits the teacher's mass per mode (mode covering) but, at small capacity, blurs;
# * **DMD** (distribution matching distillation, DMD2's settings: a learned critic, 5 critic
#   updates per generator update), a reverse-KL objective: sharp samples, known to drop mass from
#   modes; **DMD + regression** adds DMD1's regression onto teacher ODE pairs;
# * **rCM**, sCD plus a small DMD term (weight 0.01) after the warm-up.
#
# The teacher is the exact TrigFlow field of the mixture; every student (and critic) starts from
# a diffusion model of its own architecture (`scm_jax.toy.recipes.pretrain`), and all take the
# same number of generator updates (`recipes.distill` with `recipes.DISTILL`, the recipes of
# `benchmarks/toy_dmd_rcm.py`). The student is the capacity-limited MP-MLP (one block of width
# 16), where the trade-off between coverage and precision shows. The scores are
# `scm_jax.toy.mode_statistics`: the mass per mode against the mixture weights (coverage) and
# the distance of samples to their mode in component stds (precision).

# %%
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

from scm_jax.run.sampler import Sampler
from scm_jax.toy import mode_statistics, recipes, sliced_wasserstein

# %% tags=["parameters"]
QUICK = False  # True: the short version CI runs (a few steps; the same code and figures)
FIG_DIR = None  # a folder to save the figures as PNG (docs/images/ablations for the docs)
mixtures = ["ring", "grid"]  # the 8-component ring and the 5 x 5 grid of narrow modes
model = dict(recipes.SMALL_MLP)  # recipes.MLP: the reference student (4 blocks of 128)
students = ["scd", "dmd", "dmd_reg", "rcm"]  # keys of recipes.DISTILL
pretrain_steps = recipes.PRETRAIN_STEPS
distill_steps = recipes.DISTILL_STEPS  # generator updates of every student
num_samples = 8192  # samples per score
num_plot = 3000  # samples per scatter plot
seed = 0

# %%
if QUICK:
    model = {**model, "emb_channels": 16}
    mixtures, students = ["ring"], ["scd", "rcm"]
    pretrain_steps, distill_steps, num_samples, num_plot = 10, 12, 256, 256

plt.rcParams.update({"figure.dpi": 90, "savefig.dpi": 90, "font.size": 8})
SIGMA_D = recipes.SIGMA_D
LABELS = {"scd": "sCD", "dmd": "DMD", "dmd_reg": "DMD + regression", "rcm": "rCM"}


def save(fig, name):
    """Write ``fig`` to FIG_DIR/name (when FIG_DIR is set)."""
    if FIG_DIR is not None:
        Path(FIG_DIR).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIG_DIR) / name)


# %% [markdown]
# ## Distil, sample, score
#
# For every mixture: one diffusion pre-training, then each student for `distill_steps` generator
# updates; 1- and 2-step samples (t_mid = 1.1) of its EMA network.

# %%
results = {}  # (mixture, student) -> {"samples": {steps: (N, 2)}, "stats": {steps: dict}}
data = {}
for mixture in mixtures:
    mix = recipes.MIXTURES[mixture]()
    arrays = mix.arrays()
    data[mixture] = np.asarray(mix.sample(jax.random.key(1234), num_samples))
    ref = mode_statistics(data[mixture], *arrays)
    init = recipes.pretrain(model, mixture, steps=pretrain_steps)
    print(
        f"{mixture}: data coverage TV {ref['coverage_tv']:.3f}, precision "
        f"{ref['precision_dist']:.2f} std, {ref['precision_in_radius']:.1%} within 2 std"
    )
    for name in students:
        nd, res = recipes.distill(name, init, model, mixture, steps=distill_steps, seed=seed)
        sampler = Sampler(nd, res.ema_params["net"], sigma_d=SIGMA_D, batch_size=num_samples)
        samples = {n: sampler.sample(seed + 1, num_samples, steps=n) for n in (1, 2)}
        stats = {n: mode_statistics(x, *arrays) for n, x in samples.items()}
        for n, x in samples.items():
            stats[n]["sw2"] = float(sliced_wasserstein(x, data[mixture], jax.random.key(7)))
        results[mixture, name] = {"samples": samples, "stats": stats, "seconds": res.seconds}
        print(
            "  ".join(
                f"{LABELS[name]:16s} {n} step{'s' * (n > 1)}: coverage TV "
                f"{s['coverage_tv']:.3f} ({s['modes_covered']} modes), precision "
                f"{s['precision_dist']:.2f} std, {s['precision_in_radius']:.1%} in 2 std, "
                f"SW₂ {s['sw2']:.4f} |"
                for n, s in stats.items()
            )
            + f" ({res.seconds:.0f} s)"
        )
    results[mixture, "data"] = {"samples": {1: data[mixture]}, "stats": {1: ref}}

# %% [markdown]
# ## Samples against the modes
#
# Grey: data. Circles: two standard deviations around each component mean (87 % of a 2-D
# Gaussian component's mass lies inside). Top row 1 step, bottom row 2 steps.

# %%
for mixture in mixtures:
    mix = recipes.MIXTURES[mixture]()
    means, stds, _ = (np.asarray(a) for a in mix.arrays())
    fig, ax = plt.subplots(2, len(students), figsize=(2.6 * len(students), 5.2), squeeze=False)
    lim = np.abs(means).max() + 3 * stds.max()
    for j, name in enumerate(students):
        for i, n in enumerate((1, 2)):
            a = ax[i, j]
            x = results[mixture, name]["samples"][n][:num_plot]
            s = results[mixture, name]["stats"][n]
            a.scatter(*data[mixture][:num_plot].T, s=1, c="0.8", rasterized=True)
            a.scatter(*x.T, s=1, c=f"C{j}", rasterized=True)
            for m, sd in zip(means, stds, strict=True):
                a.add_patch(plt.Circle(m, 2 * sd, fill=False, lw=0.6, color="k"))
            a.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
            a.set_title(
                f"{LABELS[name]}, {n} step{'s' * (n > 1)}\nTV {s['coverage_tv']:.3f}, "
                f"{s['precision_in_radius']:.0%} in 2 std",
                fontsize=7,
            )
    fig.suptitle(f"Distilled students on the {mixture} mixture ({distill_steps} updates)")
    fig.tight_layout()
    save(fig, f"04_samples_{mixture}.png")

# %% [markdown]
# ## Mass per mode and precision
#
# Left: the fraction of 1-step samples nearest to each mode against the mixture weight (the
# dotted line; the data's own fraction at this sample size in grey). Right: coverage (total
# variation between the two, 0 is perfect) against precision (fraction of samples within two
# stds of their mode; the data's value is 1 − e⁻² ≈ 0.865), for 1 and 2 steps.

# %%
fig, ax = plt.subplots(
    len(mixtures),
    2,
    figsize=(11, 3 * len(mixtures)),
    squeeze=False,
    gridspec_kw={"width_ratios": [2, 1]},
)
for r, mixture in enumerate(mixtures):
    weights = np.asarray(recipes.MIXTURES[mixture]().arrays()[2])
    k = np.arange(len(weights))
    width = 0.8 / (len(students) + 1)
    ax[r, 0].bar(
        k - 0.4 + width / 2,
        results[mixture, "data"]["stats"][1]["mass"],
        width,
        color="0.7",
        label="data",
    )
    for j, name in enumerate(students):
        mass = results[mixture, name]["stats"][1]["mass"]
        ax[r, 0].bar(k - 0.4 + width * (j + 1.5), mass, width, color=f"C{j}", label=LABELS[name])
    ax[r, 0].step(
        np.r_[k - 0.5, k[-1] + 0.5],
        np.r_[weights, weights[-1]],
        "k:",
        where="post",
        lw=0.8,
        label="weight",
        zorder=3,
    )
    ax[r, 0].set(xlabel="mode", ylabel="mass (1 step)", title=f"{mixture}: mass per mode")
    ax[r, 0].legend(fontsize=6, ncol=3)
    for j, name in enumerate(students):
        for n, marker in ((1, "o"), (2, "s")):
            s = results[mixture, name]["stats"][n]
            ax[r, 1].scatter(
                s["coverage_tv"],
                s["precision_in_radius"],
                color=f"C{j}",
                marker=marker,
                label=f"{LABELS[name]}, {n} step{'s' * (n > 1)}",
            )
    ref = results[mixture, "data"]["stats"][1]
    ax[r, 1].scatter(
        ref["coverage_tv"], ref["precision_in_radius"], c="k", marker="*", label="data"
    )
    ax[r, 1].set(
        xlabel="coverage TV (lower is better)",
        ylabel="fraction within 2 std",
        title=f"{mixture}: coverage against precision",
    )
    ax[r, 1].set_xscale("symlog", linthresh=0.01)
    ax[r, 1].legend(fontsize=5, ncol=2)
fig.tight_layout()
save(fig, "04_coverage_precision.png")

# %% [markdown]
# The full run's numbers are in docs/ablations.md, next to `benchmarks/toy_dmd_rcm.py`'s
# multi-seed results.
