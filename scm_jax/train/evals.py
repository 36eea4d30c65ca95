"""Periodic FID during training: the config's ``evals`` section (``configlib.EVAL_DEFAULTS``).

With ``evals.every_kimg > 0`` the loop evaluates the first EMA every that many kimg and at the
end: consistency runs at each of ``evals.steps``, diffusion runs with EDM Heun at
``evals.teacher_nfe`` (0: ``2 train.teacher_sample_steps - 1``), sCD runs also their teacher once
(first evaluation) when ``evals.teacher_nfe > 0``. Each evaluation writes ``fid/<setting>``
(``fid/1step``, ``fid/2step``, ``fid/heun18``, ``fid/teacher_heun18``) and ``eval_time_s`` to the
run's metric writers at that step, a console line, and ``<workdir>/eval/eval_step<N>.json``.
Everything it needs (reference statistics, Inception weights, image-shaped samples) is checked
when the run starts, before any training.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
from jax.sharding import Mesh

from scm_jax.eval import features, fid, runner
from scm_jax.sampler import Sampler


class PeriodicEval:
    """The ``evals`` hook of the training loop; build it with :meth:`create`.

    Args:
      config: the run's config; mesh: the training mesh (samples are batch-sharded over it).
      sample_shape: one sample's shape (must be an image).
      workdir: the run's folder (JSON results go to ``eval/``); log: console lines.
    Raises:
      ValueError / FileNotFoundError: no or unreadable ``evals.ref``, missing Inception weights,
        statistics of another feature size, a model that does not make images, bad settings.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, mesh: Mesh, sample_shape: tuple[int, ...],
        workdir: str | Path, log: Callable[[str], None],
    ) -> None:  # fmt: skip
        ev = config.evals
        if not ev.ref:
            raise ValueError(
                f"evals.every_kimg={ev.every_kimg} needs reference statistics: set "
                "--config.evals.ref=FILE.npz (written by `scm-jax fid-stats --data ... --out "
                "FILE.npz`), or --config.evals.every_kimg=0 to turn periodic FID off"
            )
        features.check_image_shape(sample_shape, "this config's model")
        if ev.num < 2 or any(int(s) < 1 for s in ev.steps):
            raise ValueError(f"evals.num ({ev.num}) must be >= 2 and evals.steps {ev.steps} >= 1")
        self.objective, self.log, self.workdir = config.objective, log, Path(workdir)
        if self.objective == "diffusion":
            nfe = ev.teacher_nfe or 2 * config.train.teacher_sample_steps - 1
            self.settings = [(f"heun{runner.heun_steps(nfe)}", runner.heun_steps(nfe))]
        else:
            self.settings = [(f"{int(s)}step", int(s)) for s in ev.steps]
        self.teacher_steps = None
        if self.objective in ("scd", "dmd", "rcm") and ev.teacher_nfe:
            self.teacher_steps = runner.heun_steps(ev.teacher_nfe)
        self.ref = fid.load_stats(ev.ref)
        meta = self.ref[3]
        extractor = features.load_extractor(
            ev.inception or None, meta.get("resize") or features.DEFAULT_RESIZE,
            meta.get("input_convention") or features.DEFAULT_CONVENTION,
        )  # fmt: skip
        features.check_reference(self.ref, extractor.dim)
        self.num, self.seed = int(ev.num), int(ev.seed)
        batch = int(ev.batch_size) or features.default_batch_size()
        self.pipe = features.FeaturePipeline(extractor, mesh, batch)
        self.teacher_done = False
        names = ", ".join(name for name, _ in self.settings)
        log(f"periodic FID every {ev.every_kimg:g} kimg: {names} on {self.num} samples against "
            f"{ev.ref} (Inception {extractor.info.get('variant')})")  # fmt: skip
        if self.num <= extractor.dim:
            log(f"  note: evals.num={self.num} <= {extractor.dim} feature dimensions: singular "
                "covariance, FID biased upwards (for trends, not comparisons)")  # fmt: skip

    @classmethod
    def create(
        cls, config: ml_collections.ConfigDict, mesh: Mesh, sample_shape: tuple[int, ...],
        workdir: str | Path, log: Callable[[str], None],
    ) -> PeriodicEval | None:  # fmt: skip
        """The hook, or None when ``evals.every_kimg`` is 0 (off)."""
        if config.evals.every_kimg <= 0:
            return None
        return cls(config, mesh, sample_shape, workdir, log)

    def __call__(
        self, sampler: Sampler, step: int, writers: Any, teacher: Sampler | None = None,
        is_main_process: bool = True,
    ) -> dict[str, float]:  # fmt: skip
        """Evaluate ``sampler`` (the EMA parameters, on the mesh) and write the results.

        Args:
          sampler: the run's sampler holding the EMA parameters.
          step: the training step (metrics and file name).
          writers: the run's metric writers.
          teacher: sCD: a diffusion sampler of the teacher (evaluated once).
          is_main_process: only the main process writes.
        Returns:
          The scalars written: ``fid/<setting>`` and ``eval_time_s``.
        """
        t0 = time.perf_counter()
        settings = [runner.make_setting(n, sampler, s, "EMA", None) for n, s in self.settings]
        if teacher is not None and self.teacher_steps and not self.teacher_done:
            g = sampler.guidance if sampler.nd.guidance_input else None
            g = g if teacher.nd.num_classes else None
            name = f"teacher_heun{self.teacher_steps}"
            settings.append(runner.make_setting(name, teacher, self.teacher_steps, "teacher", g))
            self.teacher_done = True
        results = runner.run_settings(
            settings, self.num, self.ref, self.pipe, seed=self.seed,
            source=f"{self.workdir} step {step}", log=self.log,
        )  # fmt: skip
        scalars = {f"fid/{r['setting']}": r["fid"] for r in results}
        scalars["eval_time_s"] = time.perf_counter() - t0
        if is_main_process:
            writers.write_scalars(step, scalars)
            runner.write_json(self.workdir / "eval" / f"eval_step{step}.json", {
                "workdir": str(self.workdir), "objective": self.objective, "step": step,
                "num": self.num, "seed": self.seed, "ref": str(self.ref[3].get("path")),
                "inception": self.pipe.extractor.meta(f"{self.workdir} step {step}"),
                "devices": self.pipe.mesh.size, "batch_size": self.pipe.batch,
                "results": results, "time": time.time(),
            })  # fmt: skip
        shown = "  ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k.startswith("fid/"))
        self.log(f"eval step {step}: {shown}  ({scalars['eval_time_s']:.1f} s)")
        return scalars
