"""Sample grids written during training: the same noise and labels every time, so grids of
successive steps show how the model changes, not how the noise does.

Consistency models get a 1-step and a 2-step grid; diffusion runs (teachers) a grid from the
EDM Heun sampler. Images go to ``<workdir>/samples/<step>_<kind>.png`` and to TensorBoard; point
data (the toy mixture) to ``.npz`` files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scm_jax import image_grids, objectives
from scm_jax.run.sampler import Sampler


def preview_kinds(objective: str, ode_steps: int) -> dict[str, int]:
    """``{name: steps}`` of the grids written for ``objective``."""
    if objectives.is_diffusion(objective):
        return {f"heun{ode_steps}": ode_steps}
    return {"1step": 1, "2step": 2}


def write_previews(
    sampler: Sampler, workdir: str | Path, step: int, writers: Any, *, num: int = 64,
    ode_steps: int = 18, seed: int = 0, is_main_process: bool = True,
) -> list[str]:  # fmt: skip
    """Sample ``num`` examples per kind from ``sampler`` and write them.

    Args:
      sampler: a :class:`~scm_jax.run.sampler.Sampler` holding the parameters to show (an EMA).
      workdir: the run's folder; files go to ``samples/``.
      step: the training step (names the files).
      writers: ``scm_jax.train.writers`` writer (images also go to TensorBoard).
      num: samples per grid; ode_steps: Heun steps of a teacher's grid; seed: fixes the noise.
      is_main_process: only the main process writes (all processes sample: the parameters
        may be sharded across them).
    Returns:
      The paths written.
    """
    out_dir = Path(workdir) / "samples"
    paths: list[str] = []
    for name, steps in preview_kinds(sampler.objective, ode_steps).items():
        x = sampler.sample(seed, num, steps=steps)
        if not is_main_process:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        if len(sampler.shape) == 3:
            path = out_dir / f"{step:08d}_{name}.png"
            grid = image_grids.make_grid(x)
            image_grids.save_png(path, grid)
            writers.write_images(step, {f"samples/{name}": grid})
        else:
            path = out_dir / f"{step:08d}_{name}.npz"
            image_grids.save_samples_npz(path, x)
        paths.append(str(path))
    return paths
