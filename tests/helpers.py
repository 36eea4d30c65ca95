"""Small builders shared by the tests: a tiny U-Net, a parameter perturbation, smoke configs of
the repository's configs, and digests of trees and folders (one place: import them from here)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.config import defaults
from scm_jax.networks import build_network

SIGMA_D = 0.5


def tiny_unet(**over):
    """A tiny U-Net with attention, labels and the guidance input (resolutions 8 and 4)."""
    cfg = dict(
        arch="edm2_unet", img_resolution=8, img_channels=3, num_classes=5, model_channels=8,
        channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=8,
        guidance_input=True, sigma_d=SIGMA_D,
    )  # fmt: skip
    cfg.update(over)
    return build_network(cfg)


def randomize(params, seed, scale=0.3):
    """Perturb every parameter (gains too) so the network is far from its trivial init.

    Uses numpy's RNG: eager jax.random calls per leaf would each compile an XLA kernel.
    """
    rng = np.random.default_rng(seed)

    def perturb(p):
        noise = scale * rng.standard_normal(p.shape) + (0.5 if p.ndim == 0 else 0.0)
        return p + jnp.asarray(noise, p.dtype)

    return jax.tree.map(perturb, params)


def smoke_config(spec: str, steps: int = 2, **overrides):
    """``spec`` with its smoke settings, ``steps`` optimiser steps, logs every step."""
    cfg = defaults.load_config(spec)
    with cfg.unlocked():
        cfg.total_kimg = steps * cfg.batch_size / 1000
        cfg.train.log_every_kimg = cfg.batch_size / 1000
        for key, value in overrides.items():
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return cfg


def quiet(_line: str) -> None:
    """Discard a progress line (the tests read metrics.jsonl instead)."""


def tree_bytes(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def folder_digest(path: Path) -> dict[str, str]:
    """Content hash of every file under ``path`` (to prove nothing was overwritten)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def read_and_react(proc, react) -> str:
    """Read a subprocess's output line by line, calling ``react(line)`` (which may signal the
    process) until it returns True; then wait for the end (300 s at most) and kill it if it is
    still running. Returns the whole output (stdout with stderr merged into it)."""
    out: list[str] = []
    rest = ""
    try:
        for line in proc.stdout:
            out.append(line)
            if react(line):
                break
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return "".join(out) + rest
