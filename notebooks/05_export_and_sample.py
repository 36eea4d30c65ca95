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
# # From a training run to samples in JAX and in PyTorch
#
# The whole path a user takes with a trained model (docs/export.md):
#
# 1. `scm-jax train` (the command line, run in this process through `scm_jax.cli.main`): here a
#    short sCT run of the MNIST smoke model (a 0.05 M-parameter class-conditional U-Net), or any
#    existing run folder (`workdir`);
# 2. `scm-jax export --to safetensors`: the run's EMA weights as `model.safetensors` (PyTorch
#    names and layouts) + `config.json`;
# 3. `scm_jax.load_sampler(export_dir)`: sampling in JAX from the export;
# 4. `scm_jax.torch.load_network(export_dir)`: the same network as a `torch.nn.Module`, with
#    its 1- and 2-step samplers.
#
# Both frameworks are given the same standard-normal draws, so their samples must agree to
# float32 rounding. The training run is short: the samples show what this network has learned
# in `train_steps` steps, not what sCM reaches (docs/training.md has the real MNIST recipe).

# %%
import json
import shutil
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
import torch

import scm_jax
import scm_jax.torch as scm_torch
from scm_jax import cli
from scm_jax.export.stablehlo import consistency_noise
from scm_jax.image_grids import make_grid

# %% tags=["parameters"]
QUICK = False  # True: the short version CI runs (a few steps; the same code and figures)
FIG_DIR = None  # a folder to save the figures as PNG (docs/images/ablations for the docs)
workdir = None  # an existing run (or export) to use; None: train a short run here
config = "mnist:smoke"  # the config of that short run (scm-jax train --config)
train_steps = 600  # its length, in steps of batch_size
batch_size = 32
num_samples = 40  # samples per framework (4 of each digit)
seed = 0

# %%
if QUICK:
    train_steps, num_samples = 2, 8

plt.rcParams.update({"figure.dpi": 90, "savefig.dpi": 90, "font.size": 8})
scratch = Path(tempfile.mkdtemp(prefix="scm_jax_nb05_"))


def save(fig, name):
    """Write ``fig`` to FIG_DIR/name (when FIG_DIR is set)."""
    if FIG_DIR is not None:
        Path(FIG_DIR).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(FIG_DIR) / name)


def scm_jax_cli(*args):
    """Run the command line ``scm-jax ARGS`` (in this process); fail on an error."""
    print("$ scm-jax " + " ".join(map(str, args)))
    status = cli.main([str(a) for a in args])
    if status != 0:
        raise RuntimeError(f"scm-jax {args[0]} failed with status {status}")


# %% [markdown]
# ## Train (or bring a run) and export

# %%
if workdir is None:
    workdir = scratch / "run"
    scm_jax_cli(
        "train",
        "--config",
        config,
        "--workdir",
        workdir,
        f"--config.batch_size={batch_size}",
        f"--config.total_kimg={train_steps * batch_size / 1000}",
        f"--config.loss.tangent_warmup_steps={max(1, train_steps // 4)}",
        "--config.loss.tangent_warmup_fraction=0",
        f"--config.train.log_every_kimg={max(1, train_steps // 4) * batch_size / 1000}",
        "--config.train.ckpt_every_kimg=0",
        "--config.train.sample_every_kimg=0",
    )
export_dir = scratch / "export"
scm_jax_cli("export", "--workdir", workdir, "--to", "safetensors", "--out", export_dir)
print(sorted(p.name for p in export_dir.iterdir()))
export_config = json.loads((export_dir / "config.json").read_text())
print({k: export_config[k] for k in ("objective", "sigma_d", "t_max", "t_mid", "step")})

# %% [markdown]
# ## Sample in JAX and in PyTorch
#
# `Sampler.sample_batch(key, ...)` draws its noise from `key`;
# `scm_jax.export.stablehlo.consistency_noise(key, shape, steps)` returns exactly those draws,
# `(steps, B, H, W, C)`, which PyTorch takes as `(steps, B, C, H, W)`.

# %%
sampler = scm_jax.load_sampler(export_dir)
net = scm_torch.load_network(export_dir)
print(f"JAX: {type(sampler).__name__}, one sample {sampler.shape}; PyTorch: {type(net).__name__}")
labels = np.arange(num_samples) % 10
key = jax.random.key(seed)
images, errors = {}, {}
for steps in (1, 2):
    x_jax = np.asarray(sampler.sample_batch(key, num_samples, steps, labels))
    noise = np.asarray(consistency_noise(key, (num_samples, *sampler.shape), steps))
    with torch.no_grad():
        x_torch = net.sample(
            torch.from_numpy(noise).permute(0, 1, 4, 2, 3),
            steps=steps,
            labels=torch.from_numpy(labels),
        )
    x_torch = x_torch.permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC
    images[steps] = x_jax, x_torch
    errors[steps] = float(np.abs(x_jax - x_torch).max())
    print(f"{steps} step(s): max |JAX - PyTorch| = {errors[steps]:.2e} (samples in ~[-1, 1])")

# F_theta itself, on the same noisy inputs at a few times.
x_t = sampler.sigma_d * np.asarray(jax.random.normal(jax.random.key(1), (8, *sampler.shape)))
t = np.linspace(0.1, export_config["t_max"], 8).astype(np.float32)
F_jax = np.asarray(sampler.network(x_t / sampler.sigma_d, t, labels[:8]))
with torch.no_grad():
    F_torch = (
        net(
            torch.from_numpy(x_t / sampler.sigma_d).permute(0, 3, 1, 2),
            torch.from_numpy(t),
            torch.from_numpy(labels[:8]),
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
errors["F"] = float(np.abs(F_jax - F_torch).max())
print(f"F_theta: max |JAX - PyTorch| = {errors['F']:.2e} (|F| up to {np.abs(F_jax).max():.2f})")
assert max(errors.values()) < 1e-3, errors  # float32 rounding, not a different network

# %%
fig, ax = plt.subplots(2, 3, figsize=(10, 4.4))
for r, steps in enumerate((1, 2)):
    x_jax, x_torch = images[steps]
    diff = np.abs(x_jax - x_torch)
    scaled = diff / max(float(diff.max()), 1e-30) * 2 - 1  # the difference, scaled to [-1, 1]
    panels = [
        (x_jax, f"JAX, {steps} step(s)", "gray"),
        (x_torch, f"PyTorch, {steps} step(s)", "gray"),
        (scaled, f"|difference| / {diff.max():.1e}", "magma"),
    ]
    for a, (x, title, cmap) in zip(ax[r], panels, strict=True):
        a.imshow(make_grid(np.clip(x, -1, 1), ncols=10)[..., 0], cmap=cmap, vmin=0, vmax=255)
        a.set(title=title, xticks=[], yticks=[])
fig.suptitle(
    f"{config}, {train_steps} steps of {batch_size}, exported to safetensors: one column per digit"
    " class 0-9, same noise in both frameworks"
)
fig.tight_layout()
save(fig, "05_jax_vs_pytorch.png")

# %% [markdown]
# The export folder also feeds `scm-jax sample --workdir`, `--config.teacher.workdir` (an sCD
# teacher) and, with `--to onnx` / `--to stablehlo`, ONNX Runtime and `jax.export`
# (docs/export.md).

# %%
shutil.rmtree(scratch)  # this notebook's short run and export (a `workdir` passed in is kept)
