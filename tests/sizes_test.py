"""EDM2 sizes computed on abstract shapes: parameter counts and forward FLOPs against EDM2."""

from __future__ import annotations

import jax
import pytest

from scm_jax.config import defaults
from scm_jax.info import network_flops, stock_edm2_config
from scm_jax.networks import build_network

# EDM2 img512 presets (64x64x4 latents, 1000 classes): parameters (M) and forward GFLOP (2 x MAC),
# as reported by EDM2 / sCM and counted with torch's FlopCounter on NVlabs/edm2.
EDM2 = {
    "s": (280.2, 201.6),
    "m": (497.8, 357.9),
    "l": (777.6, 558.7),
    "xl": (1119.4, 804.0),
    "xxl": (1523.4, 1093.8),
}


@pytest.mark.slow
@pytest.mark.parametrize("size", sorted(EDM2))
def test_stock_edm2_params_and_flops_match(size):
    cfg = defaults.load_config(f"imagenet512:size={size},objective=diffusion")
    nd = build_network(stock_edm2_config(cfg.model))
    params = nd.abstract_params()
    n = sum(p.size for p in jax.tree.leaves(params))
    want_params, want_gflops = EDM2[size]
    assert abs(n / 1e6 - want_params) / want_params < 0.003, n
    gflops = network_flops(nd, params, ("forward",))["forward"] / 1e9
    assert abs(gflops - want_gflops) / want_gflops < 0.03, gflops


@pytest.mark.parametrize("size", ["s", "xxl"])
def test_scm_conditioning_adds_the_adn_shift_and_guidance_layers(size):
    """ADN adds one C_emb x C_out shift projection per block; guidance one C_noise x C_emb layer."""
    cfg = defaults.load_config(f"imagenet512:size={size},objective=scd")
    scm = build_network(cfg.model).abstract_params()["net"]
    stock = build_network(stock_edm2_config(cfg.model)).abstract_params()["net"]

    def count(tree, part=""):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return sum(p.size for path, p in flat if part in jax.tree_util.keystr(path))

    shifts, guidance = count(scm, "emb_shift"), count(scm, "emb_guidance")
    stock_gains = count(stock, "emb_gain")  # ADN has no multiplicative gain scalar
    assert count(scm) - count(stock) == shifts + guidance - stock_gains
    c = cfg.model.model_channels
    assert guidance == c * 4 * c  # C_noise x C_emb
    # Reference §2.6: a scale+shift projection per block adds 13.7 M (S) ... 74.7 M (XXL).
    assert shifts / 1e6 == pytest.approx({"s": 13.7, "xxl": 74.7}[size], abs=0.05)


@pytest.mark.parametrize("objective", ["dmd", "rcm"])
def test_dmd_and_rcm_states_hold_a_critic_of_the_student_size(objective):
    """The critic (fake score) has the student's parameters and optimizer state, sharded alike."""
    from scm_jax.info import model_info

    cfg = defaults.load_config(f"imagenet512:size=s,objective={objective}")
    info = model_info(cfg, devices=64, mesh={"data": 8, "fsdp": 8}, flops=False)
    total, per_device = info["state_bytes_breakdown"], info["state_bytes_per_device_breakdown"]
    for b in (total, per_device):
        assert b["critic"] == b["params"] + b["optimizer"] and b["teacher"] > 0
    assert per_device["critic"] < total["critic"] / 7  # FSDP-split over 8
