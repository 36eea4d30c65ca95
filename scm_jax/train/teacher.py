"""Weights from other runs: the sCD teacher, and ``init_from`` starting points.

Both read a training workdir's EMA network parameters (the ``emas`` checkpoint item), check the
architecture against the config this run expects, and place the parameters in the run's
shardings. The toy config's teacher is the exact Gaussian-mixture field instead
(``teacher.kind = 'exact_gmm'``): no checkpoint, no parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from scm_jax import objectives
from scm_jax.data.scale import data_scale
from scm_jax.guidance import ApplyFn
from scm_jax.networks import NetworkDef, build_network
from scm_jax.run.emas import load_ema_checkpoint
from scm_jax.run.layout import check_same_architecture, load_run_config


@dataclasses.dataclass(frozen=True)
class Teacher:
    """sCD's teacher: ``apply_fn(params, x_scaled, t, labels, guidance, key)`` and its params.

    ``nd`` is None for an exact (analytic) teacher; ``source`` says where it came from.
    """

    apply_fn: ApplyFn
    params: Any
    nd: NetworkDef | None
    source: str


def check_same_scale(
    config: Mapping[str, Any], run_cfg: Mapping[str, Any], *, what: str, where: str | Path
) -> None:
    """A teacher or ``init_from`` run must have been trained on data at the same scale
    (``scm_jax.data.scale``): a network trained on other units computes another field.

    Raises:
      ValueError: the two data scales differ (the message gives both and the fix).
    """
    sigma_d = float(config["trigflow"]["sigma_d"])
    mine = data_scale(config["dataset"], sigma_d)
    theirs = data_scale(run_cfg.get("dataset") or {}, float(run_cfg["trigflow"]["sigma_d"]))
    close = len(mine.mean) == len(theirs.mean) and all(
        abs(a - b) <= 1e-6 * max(1.0, abs(b))
        for a, b in zip(mine.mean + mine.std, theirs.mean + theirs.std, strict=True)
    )
    if not close or abs(mine.sigma_d - theirs.sigma_d) > 1e-9:
        raise ValueError(
            f"the {what} in {where} was trained on data at another scale (its mean "
            f"{list(theirs.mean) or 'none'}, std {list(theirs.std) or 'none'}, sigma_d "
            f"{theirs.sigma_d}) than this run (mean {list(mine.mean) or 'none'}, std "
            f"{list(mine.std) or 'none'}, sigma_d {mine.sigma_d}); use the same "
            f"dataset.normalize / mean / std (and sigma_d) as the {what}"
        )


def load_teacher(config: Any, mesh: Mesh) -> Teacher:
    """The teacher a sCD, DMD or rCM config asks for.

    Raises:
      ValueError: no teacher configured (the message says how to train one), a teacher that is
        not a diffusion model, or one of another architecture.
    """
    t_cfg = config.teacher
    if t_cfg.get("kind", "") == "exact_gmm":
        from scm_jax.gmm import GaussianMixture, teacher_apply_fn

        gmm = GaussianMixture.from_dict(
            {k: config.dataset[k] for k in ("means", "stds", "weights")}
        )
        return Teacher(teacher_apply_fn(gmm, config.trigflow.sigma_d), None, None, "exact_gmm")
    name = {"scd": "sCD", "dmd": "DMD", "rcm": "rCM"}.get(config.objective, config.objective)
    if not t_cfg.workdir:
        raise ValueError(
            f"{name} needs a teacher: set --config.teacher.workdir=DIR to the workdir of a "
            "diffusion run of the same architecture, trained with `scm-jax train --config "
            "<config>:objective=diffusion --workdir DIR`"
        )
    run_cfg = load_run_config(t_cfg.workdir)
    if not objectives.is_diffusion(run_cfg.get("objective")):
        raise ValueError(
            f"the teacher in {t_cfg.workdir} was trained with objective "
            f"{run_cfg.get('objective')!r}; {name} distils a diffusion model (objective=diffusion)"
        )
    check_same_architecture(config.model, run_cfg["model"], what="teacher", where=t_cfg.workdir)
    check_same_scale(config, run_cfg, what="teacher", where=t_cfg.workdir)
    params, run_cfg, name, step = load_ema_checkpoint(
        t_cfg.workdir, config.model, mesh, sigma_rel=float(t_cfg.get("ema_std", 0.0) or 0.0),
        what="teacher", rules=config.mesh.rules,
    )  # fmt: skip
    nd = build_network({**run_cfg["model"], "dropout": 0.0})
    return Teacher(nd.apply_fn, params, nd, f"{t_cfg.workdir} (EMA {name}) at step {step}")
