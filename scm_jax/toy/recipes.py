"""The reference toy experiments on Gaussian mixtures, evaluated against the exact flow map and
the data. Shared by the tests and the benchmarks:

* :func:`run`: a small MP-MLP trained by sCD (exact teacher) or sCT from scratch on the
  8-component ring (``tests/toy_training_test.py``, ``benchmarks/toy_gmm.py``);
* :func:`distill` / :func:`run_distill`: sCD, DMD (with or without DMD's regression term) and
  rCM from the same diffusion-pretrained network, at an equal number of generator updates, on
  the ring or the 25-mode grid (:data:`MIXTURES`; ``tests/toy_dmd_test.py``,
  ``benchmarks/toy_dmd_rcm.py``, ``notebooks/04_distillation_mode_coverage.py``).
"""

from __future__ import annotations

from typing import Any

import jax

from scm_jax import gmm as gmm_lib
from scm_jax import objectives
from scm_jax.networks import NetworkDef, build_network
from scm_jax.toy.evaluate import evaluate_consistency_model, evaluate_modes
from scm_jax.toy.fit import FitResult, fit
from scm_jax.toy.fit_distill import fit_distill

SIGMA_D = 0.5
MLP = {"arch": "mlp", "data_dim": 2, "hidden": 128, "depth": 4, "emb_channels": 128,
       "sigma_d": SIGMA_D}  # fmt: skip
# A capacity-limited student (one residual block of width 16): where the objectives' trade-off
# between mode coverage and precision shows (docs/method.md).
SMALL_MLP = {**MLP, "hidden": 16, "depth": 1}
FIT = {"sigma_d": SIGMA_D, "batch_size": 256, "lr": 2e-3, "P_mean": -1.0, "P_std": 1.6}
STEPS = {"scd": 1500, "sct": 3000}
MIXTURES = {"ring": gmm_lib.ring_mixture, "grid": gmm_lib.grid_mixture}

# Distillation comparison: every student and critic starts from a diffusion model of its own
# architecture (PRETRAIN_STEPS, the teacher's proposal -0.8/1.6); the teacher is the exact field.
PRETRAIN_STEPS = 1000
DISTILL_STEPS = 600
DMD2 = {"critic_updates": 5}  # one-step, TTUR 5 (DMD2), p_D and the critic's settings: defaults
DISTILL: dict[str, dict[str, Any]] = {
    "scd": {"objective": "scd"},
    "dmd": {"objective": "dmd", "dmd": DMD2},
    # DMD1's regression to teacher ODE pairs (18 Heun steps of the exact field), lambda_reg 0.25.
    "dmd_reg": {"objective": "dmd",
                "dmd": {**DMD2, "regression_weight": 0.25, "regression_batch": 64}},
    # rCM: sCD + 0.01 DMD after the warm-up, 4 critic updates per student update, rollouts of
    # 1-4 steps at p_D times, rCM's warm-up form, no adaptive weighting (run_distill starts the
    # DMD term at the end of the warm-up, steps // 6).
    "rcm": {"objective": "rcm", "adaptive_weighting": False,
            "loss_options": {"warmup_form": "rcm"},
            "dmd": {"critic_updates": 4, "weight": 0.01, "generator_steps": 4,
                    "rollout": "random"}},
}  # fmt: skip


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


def pretrain(
    model: dict[str, Any] = MLP, mixture: str = "ring", steps: int = PRETRAIN_STEPS, seed: int = 100
) -> Any:
    """The EMA network of a diffusion model of ``model`` on ``MIXTURES[mixture]`` (the start of
    the students and critics)."""
    res = fit(
        "diffusion", build_network(model), MIXTURES[mixture](), jax.random.key(seed),
        steps=steps, ema_halflife_steps=steps / 20, chunk=250, **{**FIT, "P_mean": -0.8},
    )  # fmt: skip
    return res.ema_params["net"]


def distill_options(name: str, steps: int) -> dict[str, Any]:
    """``fit_distill``'s keyword options of ``DISTILL[name]`` at ``steps`` generator updates
    (rCM's DMD term starts at the end of the tangent warm-up, ``steps // 6``)."""
    recipe = DISTILL[name]
    options = {k: v for k, v in recipe.items() if k != "objective"}
    entry = objectives.get(recipe["objective"])
    if entry.critic and entry.scm_term:  # rCM
        options["dmd"] = {**options["dmd"], "start_step": steps // 6}
    return options


def distill(
    name: str, init_net: Any, model: dict[str, Any] = MLP, mixture: str = "ring",
    steps: int = DISTILL_STEPS, seed: int = 0,
) -> tuple[NetworkDef, FitResult]:  # fmt: skip
    """Distil the exact teacher of ``MIXTURES[mixture]`` with ``DISTILL[name]`` from ``init_net``
    (:func:`pretrain` of ``model`` on that mixture): the student's network and the
    :class:`~scm_jax.toy.fit.FitResult` (its ``ema_params['net']`` is what gets evaluated)."""
    mixture = MIXTURES[mixture]()
    nd = build_network(model)
    res = fit_distill(
        DISTILL[name]["objective"], nd, mixture, jax.random.key(seed), init_net=init_net,
        steps=steps, teacher_apply_fn=gmm_lib.teacher_apply_fn(mixture, SIGMA_D),
        warmup_steps=steps // 6, ema_halflife_steps=steps / 20, **FIT,
        **distill_options(name, steps),
    )  # fmt: skip
    return nd, res


def run_distill(
    name: str, init_net: Any, model: dict[str, Any] = MLP, mixture: str = "ring",
    steps: int = DISTILL_STEPS, seed: int = 0, num_samples: int = 8192,
) -> dict:  # fmt: skip
    """:func:`distill`, then evaluate the EMA student.

    Returns :func:`evaluate_consistency_model`'s and :func:`evaluate_modes`' metrics plus
    ``name``, ``mixture``, ``seed``, ``steps``, ``train_seconds``, ``final_loss`` and the settings.
    """
    mixture_name, mixture = mixture, MIXTURES[mixture]()
    nd, res = distill(name, init_net, model, mixture_name, steps, seed)
    options = distill_options(name, steps)
    key = jax.random.key(seed + 1)
    params = res.ema_params["net"]
    kw = {"sigma_d": SIGMA_D, "num_samples": num_samples}
    metrics = evaluate_consistency_model(nd.apply_fn, params, mixture, key, **kw)
    metrics.update(evaluate_modes(nd.apply_fn, params, mixture, jax.random.fold_in(key, 1), **kw))
    return {**metrics, "name": name, "mixture": mixture_name, "seed": seed, "steps": steps,
            "recipe": options, "train_seconds": res.seconds, "model": model, "fit": FIT,
            "final_loss": float(res.losses[-50:].mean())}  # fmt: skip
