"""ImageNet 512x512 in SD-VAE latent space (64x64x4, 1000 classes): teacher, sCT; sCD, DMD, rCM
with CFG.

  scm-jax info --config configs/imagenet512.py:size=xxl,objective=scd
  scm-jax info --config configs/imagenet512.py:size=xxl,objective=scd --devices 64 --json

Arguments: objective=diffusion|sct|scd|dmd|rcm (default scd), size=xs|s|m|l|xl|xxl (default s),
smoke.
Hyperparameters: sCM Table 5. The teacher is trained with 10% label dropout; the sCD student
distils classifier-free guidance at a per-sample scale s ~ U[1, 2] that it receives as an input.
DMD and rCM distil the same guided teacher (s ~ U[1, 2], an input of the student and the critic) for
20k iterations (sCM's sCD + adaptive VSD, Table 5), with ``defaults.dmd_options``.
Latents: (latent - mu_c) * sigma_d / sigma_c with the per-channel statistics of sCM App. G.
"""

from scm_jax.config import defaults

# size -> (teacher lr, teacher dropout, teacher iterations, teacher EMA sigma_rel,
#          sCT dropout, sCD dropout)
TABLE5 = {
    "xs": (1.2e-2, 0.0, 1_048_000, 0.025, 0.25, 0.0),  # extrapolated from EDM2 img512-xs
    "s": (1.0e-2, 0.0, 1_048_000, 0.025, 0.25, 0.0),
    "m": (9.0e-3, 0.1, 1_048_000, 0.03, 0.35, 0.1),
    "l": (8.0e-3, 0.1, 696_000, 0.015, 0.35, 0.1),
    "xl": (7.0e-3, 0.1, 598_000, 0.02, 0.35, 0.1),
    "xxl": (6.5e-3, 0.1, 376_000, 0.015, 0.35, 0.1),
}
LATENT_MEAN = (1.56, -0.695, 0.483, 0.729)
LATENT_STD = (5.27, 5.91, 4.21, 4.31)


def get_config(arg=None):
    a = defaults.parse_arg(arg, objective="scd", size="s", smoke=False)
    defaults.check_choice("objective", a.objective, defaults.OBJECTIVES)
    defaults.check_choice("size", a.size, tuple(TABLE5))
    lr, t_dropout, t_iters, t_ema, sct_dropout, scd_dropout = TABLE5[a.size]
    cm = a.objective != "diffusion"
    distil = a.objective in defaults.DISTILL_OBJECTIVES  # sCD, DMD, rCM: CFG-distilling students
    dropout = {"diffusion": t_dropout, "sct": sct_dropout}.get(a.objective, scd_dropout)
    model = defaults.edm2_model(
        a.size,
        channels=4,
        smoke=a.smoke,
        num_classes=1000,
        dropout=dropout,
        dropout_max_res=16 if cm else 64,  # teachers: every resolution
        label_dropout=0.0 if cm else 0.1,
        guidance_input=distil,
    )
    res = model["img_resolution"]
    batch = 8 if a.smoke else 2048
    iters = {"diffusion": t_iters, "sct": 100_000, "scd": 200_000, "dmd": 20_000,
             "rcm": 20_000}[a.objective]  # fmt: skip
    # the tangent warm-up (sCM: H = 10k steps); smoke runs: one step (they may be one step long)
    warmup = {"tangent_warmup_steps": 1} if a.smoke else {"tangent_warmup_steps": 10_000}
    return defaults.assemble(
        dataset={
            "name": "imagenet512_latents",
            # SD-VAE latents precomputed by the user (.npy/.npz, set path=); smoke: synthetic.
            "source": "synthetic" if a.smoke else "latents",
            "shape": (res, res, 4),
            "num_classes": 1000,
            "latent_mean": LATENT_MEAN,
            "latent_std": LATENT_STD,
        },
        objective=a.objective,
        model=model,
        sigma_d=0.5,
        P_mean=-0.8 if cm else -0.4,
        P_std=1.6 if cm else 1.0,
        optim={
            "name": "adam",
            "lr": lr * (0.01 if cm else 1.0),
            "b1": 0.9,
            "b2": 0.99,
            "eps": 1e-11,
            "lr_ref_kimg": 143_360.0,  # t_ref = 70k iterations x 2048 images
            # EDM2 ramps teachers up over 10 Mimg; whether sCM did for CMs is not stated: no.
            "lr_rampup_kimg": 0.0 if cm else 10_000.0,
            "grad_clip": 0.0,
        },
        # Teachers keep the EMA that sCD distils (teacher.ema_std); CMs the paper's 0.05 (+0.10).
        ema={"halflife_kimg": 0.0, "power_std": (0.05, 0.10) if cm else (t_ema,)},
        batch_size=batch,
        total_kimg=defaults.kimg(4 if a.smoke else iters, batch),
        teacher={
            "workdir": "",
            "ema_std": t_ema,
            "guidance_min": 1.0,
            "guidance_max": 2.0 if distil else 1.0,
        },
        **warmup,
        dmd=defaults.dmd_options(a.objective, lr=lr * 0.01, P_mean=-0.8, P_std=1.6, **warmup),
    )
