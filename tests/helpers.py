"""Small builders shared by the tests: a tiny U-Net and a parameter perturbation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
