"""CIFAR-10 32x32 (unconditional, as in sCM Table 1): teacher, sCT, sCD, DMD, rCM.

  scm-jax info --config configs/cifar10.py:objective=sct
  scm-jax info --config configs/cifar10.py:objective=scd,size=m

Arguments: objective=diffusion|sct|scd|dmd|rcm (default sct), size=xs|s|m (default s), cond
(10-class conditional instead), smoke. The paper's CIFAR backbone is DDPM++; we use the EDM2-style
U-Net at DDPM++-like widths (s: 128 channels, mult (1, 2, 2, 2), attention at 16; docs/models.md).
Hyperparameters: sCM §5 / App. G (teacher with EDM's settings; CM RAdam 1e-4, batch 512). DMD and
rCM take sCD's settings and budget plus ``defaults.dmd_options`` (docs/method.md).
"""

from scm_jax.config import defaults

SIZES = {
    "xs": (64, (1, 2, 2, 2), 2, (16,)),
    "s": (128, (1, 2, 2, 2), 3, (16,)),
    "m": (192, (1, 2, 2, 2), 4, (16,)),
}
SMOKE = (16, (1, 2), 1, (16,))


def get_config(arg=None):
    a = defaults.parse_arg(arg, objective="sct", size="s", cond=False, smoke=False)
    defaults.check_choice("objective", a.objective, defaults.OBJECTIVES)
    defaults.check_choice("size", a.size, tuple(SIZES))
    mc, mult, blocks, attn = SMOKE if a.smoke else SIZES[a.size]
    cm = a.objective != "diffusion"
    classes = 10 if a.cond else 0
    model = defaults.unet_model(
        resolution=32,
        channels=3,
        num_classes=classes,
        model_channels=mc,
        channel_mult=mult,
        num_blocks=blocks,
        attn_resolutions=attn,
        channels_per_head=16 if a.smoke else 64,
        dropout={"diffusion": 0.13, "sct": 0.20, "scd": 0.0, "dmd": 0.0, "rcm": 0.0}[a.objective],
        dropout_max_res=32,  # DDPM++ applies dropout in every block
        size="smoke" if a.smoke else a.size,
    )
    batch = 8 if a.smoke else 512
    # the tangent warm-up (sCM: H = 10k steps); smoke runs: one step (they may be one step long)
    warmup = {"tangent_warmup_steps": 1} if a.smoke else {"tangent_warmup_steps": 10_000}
    return defaults.assemble(
        dataset={
            "name": "cifar10",
            # Prepared TFDS data (`tfds build cifar10`); or source='image_folder' with path= a
            # folder (or .tar.gz) of train/<class>/*.jpg. Smoke runs use synthetic images.
            "source": "synthetic" if a.smoke else "tfds",
            "tfds_name": "cifar10",
            "shape": (32, 32, 3),
            "num_classes": classes,
            "flip": True,  # EDM's CIFAR-10 recipe uses horizontal flips
            # `scm-jax data-stats` on the 50,000 training images (shared JPEG archive): std
            # 0.501, RMS 0.504 in [-1, 1], already at sigma_d = 0.5; trained as is, like the
            # paper (docs/method.md).
            "mean": (-0.0175, -0.0358, -0.1070),
            "std": (0.4905, 0.4856, 0.5213),
            "normalize": "none",
        },
        objective=a.objective,
        model=model,
        sigma_d=0.5,
        # Teacher: EDM's (-1.2, 1.2) [unsure in the paper; docs/method.md]; CM: (-1.0, 1.4).
        P_mean=-1.0 if cm else -1.2,
        P_std=1.4 if cm else 1.2,
        optim={
            "name": "radam" if cm else "adam",
            "lr": 1e-4 if cm else 1e-3,
            "b1": 0.9,
            "b2": 0.99 if cm else 0.999,
            "eps": 1e-8,
            "lr_ref_kimg": 0.0,  # constant learning rate (sCM: "no LR schedule")
            "lr_rampup_kimg": 0.0 if cm else 10_000.0,  # EDM teacher: 10 Mimg ramp-up
            "grad_clip": 0.0,
        },
        ema={"halflife_kimg": 500.0, "power_std": ()},  # EMA half-life 0.5 Mimg
        batch_size=batch,
        # Teacher 400k iterations; the CM iteration count of Table 1 is not given: 400k (App. E.3).
        total_kimg=defaults.kimg(4 if a.smoke else 400_000, batch),
        teacher={"workdir": "", "guidance_min": 1.0, "guidance_max": 1.0},
        **warmup,
        dmd=defaults.dmd_options(a.objective, lr=1e-4, P_mean=-1.0, P_std=1.4, **warmup),
    )
