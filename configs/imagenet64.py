"""ImageNet 64x64 pixels (class-conditional, 1000 classes): teacher, sCT, sCD, DMD, rCM; EDM2 sizes.

  scm-jax info --config configs/imagenet64.py:size=xl,objective=sct
  scm-jax info --config configs/imagenet64.py:size=s,objective=scd --devices 8

Arguments: objective=diffusion|sct|scd|dmd|rcm (default sct), size=xs|s|m|l|xl|xxl (default s),
smoke.
Hyperparameters: sCM Table 4 (S..XL). xs and xxl are not in the paper; their learning rate,
dropout and teacher length follow EDM2's img512 presets (marked 'extrapolated' below). DMD and rCM
take sCD's settings plus ``defaults.dmd_options``; DMD trains for DMD2's 200k x 280 images.
"""

from scm_jax.config import defaults

# size -> (teacher lr alpha_ref, teacher dropout, teacher iterations, teacher EMA sigma_rel)
TABLE4 = {
    "xs": (1.2e-2, 0.0, 1_048_000, 0.075),  # extrapolated
    "s": (1.0e-2, 0.0, 1_048_000, 0.075),
    "m": (9.0e-3, 0.1, 1_486_000, 0.06),
    "l": (8.0e-3, 0.1, 761_000, 0.04),
    "xl": (7.0e-3, 0.1, 540_000, 0.04),
    "xxl": (6.5e-3, 0.1, 540_000, 0.04),  # extrapolated
}


def get_config(arg=None):
    a = defaults.parse_arg(arg, objective="sct", size="s", smoke=False)
    defaults.check_choice("objective", a.objective, defaults.OBJECTIVES)
    defaults.check_choice("size", a.size, tuple(TABLE4))
    lr, t_dropout, t_iters, t_ema = TABLE4[a.size]
    cm = a.objective != "diffusion"
    dropout = {"diffusion": t_dropout, "sct": 0.45, "scd": 0.0, "dmd": 0.0, "rcm": 0.0}[a.objective]
    model = defaults.edm2_model(
        a.size,
        channels=3,
        smoke=a.smoke,
        num_classes=1000,
        dropout=dropout,
        dropout_max_res=16 if cm else 64,  # teachers: every resolution
    )
    res = model["img_resolution"]
    batch = 8 if a.smoke else 2048
    iters = 400_000 if cm else t_iters
    # the tangent warm-up (sCM: H = 10k steps); smoke runs: one step (they may be one step long)
    warmup = {"tangent_warmup_steps": 1} if a.smoke else {"tangent_warmup_steps": 10_000}
    total = defaults.kimg(4 if a.smoke else iters, batch)
    if a.objective == "dmd" and not a.smoke:
        total = defaults.kimg(200_000, 280)  # DMD2's ImageNet-64 run, counted in images
    return defaults.assemble(
        dataset={
            "name": "imagenet64",
            # TFDS's box-resized ImageNet (needs the manual ImageNet download to prepare), or an
            # image folder / npz of EDM2-preprocessed images. Smoke runs use synthetic images.
            "source": "synthetic" if a.smoke else "tfds",
            "tfds_name": "imagenet_resized/64x64",
            "shape": (res, res, 3),
            "num_classes": 1000,
            # ImageNet's published per-channel statistics (torchvision: mean 0.485/0.456/0.406,
            # std 0.229/0.224/0.225 in [0, 1]) in [-1, 1]; std ~0.45, within 10 % of sigma_d, so
            # trained as is, like the paper.
            "mean": (-0.030, -0.088, -0.188),
            "std": (0.458, 0.448, 0.450),
            "normalize": "none",
        },
        objective=a.objective,
        model=model,
        sigma_d=0.5,
        P_mean=-1.0 if cm else -0.8,
        P_std=1.6,
        # EDM2 inverse-sqrt decay alpha_ref / sqrt(max(step / t_ref, 1)); CM lr = teacher x 0.01.
        optim={
            "name": "adam",
            "lr": lr * (0.01 if cm else 1.0),
            "b1": 0.9,
            "b2": 0.99,
            "eps": 1e-11,
            "lr_ref_kimg": 71_680.0,  # t_ref = 35k iterations x 2048 images
            # EDM2 ramps teachers up over 10 Mimg; whether sCM did for CMs is not stated: no.
            "lr_rampup_kimg": 0.0 if cm else 10_000.0,
            "grad_clip": 0.0,
        },
        # Teachers keep the EMA that sCD distils (teacher.ema_std); CMs the paper's 0.05 (+0.10).
        ema={"halflife_kimg": 0.0, "power_std": (0.05, 0.10) if cm else (t_ema,)},
        batch_size=batch,
        total_kimg=total,
        teacher={"workdir": "", "ema_std": t_ema, "guidance_min": 1.0, "guidance_max": 1.0},
        **warmup,
        dmd=defaults.dmd_options(a.objective, lr=lr * 0.01, P_mean=-1.0, P_std=1.6, **warmup),
    )
