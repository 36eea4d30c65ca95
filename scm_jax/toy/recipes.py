"""The reference toy experiment: a small MP-MLP trained by sCD (exact teacher) or sCT on the
8-component ring mixture, then evaluated against the exact flow map and the data. Shared by
``tests/toy_training_test.py`` and ``benchmarks/toy_gmm.py``.
"""

from __future__ import annotations

from typing import Any

import jax

from scm_jax.networks import build_network
from scm_jax.toy import gmm as gmm_lib
from scm_jax.toy.evaluate import evaluate_consistency_model
from scm_jax.toy.fit import fit

SIGMA_D = 0.5
MLP = {"arch": "mlp", "data_dim": 2, "hidden": 128, "depth": 4, "emb_channels": 128,
       "sigma_d": SIGMA_D}  # fmt: skip
FIT = {"sigma_d": SIGMA_D, "batch_size": 256, "lr": 2e-3, "P_mean": -1.0, "P_std": 1.6}
STEPS = {"scd": 1500, "sct": 3000}


def run(objective: str, steps: int | None = None, seed: int = 0, **evaluate: Any) -> dict:
    """Train with ``objective`` ('scd' or 'sct') and evaluate the EMA student.

    Returns the metrics of :func:`evaluate_consistency_model` plus ``train_seconds``, ``steps``
    and the settings.
    """
    steps = STEPS[objective] if steps is None else steps
    mixture = gmm_lib.ring_mixture()
    nd = build_network(MLP)
    res = fit(
        objective, nd, mixture, jax.random.key(seed), steps=steps, warmup_steps=steps // 6,
        ema_halflife_steps=steps / 20, chunk=250,
        teacher_apply_fn=gmm_lib.teacher_apply_fn(mixture, SIGMA_D), **FIT,
    )  # fmt: skip
    metrics = evaluate_consistency_model(
        nd.apply_fn, res.ema_params["net"], mixture, jax.random.key(seed + 1), sigma_d=SIGMA_D,
        **evaluate,
    )  # fmt: skip
    return {**metrics, "train_seconds": res.seconds, "steps": steps, "objective": objective,
            "model": MLP, "fit": FIT, "final_loss": float(res.losses[-50:].mean())}  # fmt: skip
