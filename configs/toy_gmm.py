"""2-D Gaussian mixture (toy): diffusion, sCT, and sCD, DMD, rCM with the exact mixture teacher.

  scm-jax info --config configs/toy_gmm.py:objective=sct
  scm-jax info --config configs/toy_gmm.py:objective=scd,smoke

Arguments: objective=diffusion|sct|scd|dmd|rcm (default sct), smoke (tiny network for a CPU smoke
run).
The network is the residual MP-MLP (``scm_jax.networks.mlp``); ``size`` does not apply.
"""

from scm_jax.config import defaults
from scm_jax.gmm import ring_mixture


def get_config(arg=None):
    a = defaults.parse_arg(arg, objective="sct", smoke=False)
    defaults.check_choice("objective", a.objective, defaults.OBJECTIVES)
    cm = a.objective != "diffusion"
    model = {
        "arch": "mlp",
        "size": "smoke" if a.smoke else "default",
        "data_dim": 2,
        "hidden": 32 if a.smoke else 256,
        "depth": 2 if a.smoke else 4,
        "emb_channels": 16 if a.smoke else 128,
        "num_classes": 0,
        "dropout": 0.0,
        "label_dropout": 0.0,
        "guidance_input": False,
        "time_embedding": "positional",
        "c_noise_mode": "t",
        "c_noise_scale": 1.0,
        "modulation": "adn",
        "weight_channels": 16 if a.smoke else 128,
        "dtype": "float32",
        "param_dtype": "float32",
    }
    batch = 8 if a.smoke else 1024
    lr = 1e-4 if cm else 1e-3
    # the tangent warm-up (sCM: H = 10k steps); smoke runs: one step (they may be one step long)
    warmup = {"tangent_warmup_steps": 1} if a.smoke else {"tangent_warmup_steps": 1_000}
    return defaults.assemble(
        # The mixture itself is part of the config (and so of the run's config JSON): 8 components
        # on a ring of radius 0.65 with std 0.15, overall data std 0.48 ~ sigma_d.
        dataset={
            "name": "toy_gmm",
            "source": "toy_gmm",
            "shape": (2,),
            "num_classes": 0,
            "num_examples": 1_000 if a.smoke else 1_000_000,  # drawn once, from seed
            # `scm-jax data-stats --config toy_gmm`: std 0.484 (sigma_d 0.5); the exact teacher
            # is the mixture's own field, so the points are never rescaled.
            "mean": (-0.0007, 0.0),
            "std": (0.4835, 0.4835),
            **ring_mixture().to_dict(),
        },
        objective=a.objective,
        model=model,
        sigma_d=0.5,
        # Our choice for the toy: the ImageNet proposals (teacher -0.8/1.6, CM -1.0/1.6).
        P_mean=-1.0 if cm else -0.8,
        P_std=1.6,
        optim={
            "name": "radam" if cm else "adam",
            "lr": lr,
            "b1": 0.9,
            "b2": 0.99,
            "eps": 1e-8,
            "lr_ref_kimg": 0.0,  # constant learning rate
            "lr_rampup_kimg": 0.0,
            "grad_clip": 0.0,
        },
        ema={"halflife_kimg": 50.0, "power_std": ()},
        batch_size=batch,
        total_kimg=defaults.kimg(4 if a.smoke else 20_000, batch),
        teacher={"workdir": "", "kind": "exact_gmm", "guidance_min": 1.0, "guidance_max": 1.0},
        **warmup,
        dmd=defaults.dmd_options(a.objective, lr=lr, P_mean=-1.0, P_std=1.6, **warmup),
    )
