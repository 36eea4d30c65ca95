"""The training objectives: the one place that knows them by name (docs/architecture.md).

Every other module asks this table a question (``get(config.objective).needs_teacher``) instead
of comparing the name, so adding an objective is one :class:`Objective` entry here plus its loss
in :mod:`scm_jax.losses`. The entries:

- ``diffusion``: TrigFlow denoising (the teacher; reference §2); a multistep PF-ODE sampler.
- ``sct``: consistency training (reference Eq. 6-8), tangents from the data.
- ``scd``: consistency distillation, tangents from a TrigFlow teacher (with CFG).
- ``dmd``: distribution-matching distillation (DMD / DMD2): a generator and a fake-score critic.
- ``rcm``: sCD regularised by DMD (rCM): the DMD step plus sCD's consistency term.

Math floor: imports only :mod:`scm_jax.losses`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from scm_jax import losses

# How a DMD / rCM generator's samples are made during training (``dmd.rollout``).
ROLLOUTS = ("fixed", "random")


@dataclasses.dataclass(frozen=True)
class Objective:
    """One training objective.

    Attributes:
      name: the config's ``objective``.
      label: how docs and messages write it (``'sCD'``).
      summary: one line for docs and ``--help``.
      loss: the loss of the student's update (``scm_jax.losses``): ``diffusion_loss``,
        ``sct_loss`` or ``scd_loss`` for the sCM step; DMD's generator loss for the critic step.
      consistency: the network is a consistency model f(x_t, t) sampled in 1 or 2 steps; False: a
        diffusion model sampled by a multistep PF-ODE solver.
      needs_teacher: distils a TrigFlow teacher (``teacher.workdir``).
      critic: trained with a fake-score critic beside the generator (``train.step_dmd``);
        False: the sCM / diffusion step (``train.step``).
      scm_term: the loss has sCM's consistency term (JVP tangents, tangent warm-up, Eq. 8).
      tangent_from_teacher: that term's tangent comes from the teacher's velocity (sCD) rather
        than from the data (sCT).
      warmup_form: ``'scm'`` (reference Alg. 1) or ``'rcm'``, the default ``loss.warmup_form``.
      adaptive_weighting: the default ``loss.adaptive_weighting`` (rCM: a fixed prior weight).
    """

    name: str
    label: str
    summary: str
    loss: Callable[..., Any]
    consistency: bool
    needs_teacher: bool
    critic: bool = False
    scm_term: bool = False
    tangent_from_teacher: bool = False
    warmup_form: str = "scm"
    adaptive_weighting: bool = True

    @property
    def validation_section(self) -> str:
        """The config section whose ranges and relations this objective's training reads
        beyond ``loss``: ``'dmd'`` for the critic step, else ``'loss'``."""
        return "dmd" if self.critic else "loss"

    @property
    def sampler_kind(self) -> str:
        """``'consistency'`` (1- or 2-step) or ``'ode'`` (multistep Heun / Euler)."""
        return "consistency" if self.consistency else "ode"

    def step_flops(self, F: float, J: float, G: float, T: float, *, cfg_passes: int = 1,
                   critic_step: float = 0.0) -> float:  # fmt: skip
        """Model FLOPs per sample of one training step (the MFU convention, reference A2).

        Args:
          F, J, G: the student's forward, JVP (primal + tangent) and forward + backward FLOPs.
          T: one teacher forward.
          cfg_passes: teacher passes per sample (2 with classifier-free guidance, else 1).
          critic_step: for the critic step, its generator + critic cost per sample
            (``info._dmd_flops``: critic updates, rollouts, the DMD direction, regression).
        Returns:
          FLOPs per sample (float).
        """
        total = critic_step if self.critic else G
        if self.scm_term:
            total += (
                J + (cfg_passes * T if self.tangent_from_teacher else 0) + (G if self.critic else 0)
            )
        return total


_TABLE: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("diffusion", "diffusion", "TrigFlow diffusion (the teacher), PF-ODE sampling",
                  losses.diffusion_loss, consistency=False, needs_teacher=False),
        Objective("sct", "sCT", "consistency training, tangents from the data",
                  losses.sct_loss, consistency=True, needs_teacher=False, scm_term=True),
        Objective("scd", "sCD", "consistency distillation from a TrigFlow teacher (with CFG)",
                  losses.scd_loss, consistency=True, needs_teacher=True, scm_term=True,
                  tangent_from_teacher=True),
        Objective("dmd", "DMD", "distribution matching distillation: generator + fake score",
                  losses.dmd_generator_loss, consistency=True, needs_teacher=True, critic=True),
        Objective("rcm", "rCM", "sCD regularised by DMD (rCM)",
                  losses.dmd_generator_loss, consistency=True, needs_teacher=True, critic=True,
                  scm_term=True, tangent_from_teacher=True, warmup_form="rcm",
                  adaptive_weighting=False),
    )
}  # fmt: skip


def names() -> tuple[str, ...]:
    """Every objective's name, in the table's order."""
    return tuple(_TABLE)


def names_where(predicate: Callable[[Objective], bool]) -> tuple[str, ...]:
    """The names of the objectives for which ``predicate(objective)`` holds (for messages)."""
    return tuple(n for n, o in _TABLE.items() if predicate(o))


def get(name: str) -> Objective:
    """The table's entry for ``name``.

    Raises:
      ValueError: an unknown name, listing the known ones.
    """
    try:
        return _TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(_TABLE)}") from None


def known(name: Any) -> bool:
    """Whether ``name`` is an objective of the table."""
    return isinstance(name, str) and name in _TABLE


def is_diffusion(name: Any) -> bool:
    """Whether ``name`` is a known objective that trains a diffusion model (PF-ODE sampling);
    False for consistency objectives and for a missing or unknown name (an old run's config)."""
    return known(name) and not _TABLE[name].consistency
