"""Periodic FID and consistency error during training: the config's ``evals`` section
(``defaults.EVAL_DEFAULTS``).

With ``evals.every_kimg > 0`` the loop evaluates the first EMA every that many kimg and at the
end: consistency runs at each of ``evals.steps``, diffusion runs with EDM Heun at
``evals.teacher_nfe`` (0: ``2 train.teacher_sample_steps - 1``), sCD runs also their teacher once
(first evaluation) when ``evals.teacher_nfe > 0``. Each evaluation writes ``fid/<setting>``
(``fid/1step``, ``fid/2step``, ``fid/heun18``, ``fid/teacher_heun18``) and ``eval_time_s`` to the
run's metric writers at that step, a console line, and ``<workdir>/eval/eval_step<N>.json``.
Everything it needs (reference statistics, Inception weights, image-shaped samples) is checked
when the run starts, before any training.

With ``evals.consistency_every_kimg > 0`` (:class:`PeriodicConsistency`) the loop measures the
consistency error of the same EMA (``scm_jax.eval.consistency``) every that many kimg and at the
end: ``consistency/t=<t>`` per grid time, ``consistency/1step``, ``consistency/2step``,
``consistency/2step_vs_teacher`` and ``consistency_time_s``, a console line and
``<workdir>/eval/consistency_step<N>.json``; the teacher's reference is cached in
``<workdir>/consistency_ref.npz``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
from jax.sharding import Mesh

from scm_jax import objectives
from scm_jax.eval import consistency, consistency_run, features, fid, runner
from scm_jax.networks import NetworkDef
from scm_jax.run.sampler import Sampler


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
        if objectives.is_diffusion(self.objective):
            nfe = ev.teacher_nfe or 2 * config.train.teacher_sample_steps - 1
            self.settings = [(f"heun{runner.heun_steps(nfe)}", runner.heun_steps(nfe))]
        else:
            self.settings = [(f"{int(s)}step", int(s)) for s in ev.steps]
        self.teacher_steps = None
        if objectives.get(self.objective).needs_teacher and ev.teacher_nfe:
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


class PeriodicConsistency:
    """The ``evals.consistency_*`` hook of the training loop; build it with :meth:`create`.

    Args:
      config: the run's config; mesh: the training mesh (the pairs are batch-sharded over it).
      source: the run's data (the pairs are its first ``evals.consistency_num`` examples).
      teacher: the loop's teacher (``scm_jax.train.teacher.Teacher``, reused) or None.
      workdir: the run's folder (cache and JSON); log: console lines.
      is_main_process: only the main process writes the cache.
    Raises:
      ValueError / FileNotFoundError / CheckpointError: no teacher to compare with, a teacher that
        is not a diffusion run, too few examples, bad times.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, mesh: Mesh, source: Any, teacher: Any,
        workdir: str | Path, log: Callable[[str], None], is_main_process: bool = True,
    ) -> None:  # fmt: skip
        from scm_jax.run.exports import default_guidance
        from scm_jax.run.layout import config_to_dict

        ev, run_cfg = config.evals, config_to_dict(config)
        self.log, self.workdir = log, Path(workdir)
        t_model = consistency_run.resolve_teacher(
            run_cfg, workdir, ev.consistency_teacher or None, mesh, loaded=teacher
        )
        self.guidance = default_guidance(run_cfg)  # the previews' guidance input
        sigma_d = float(config.trigflow.sigma_d)
        pairs = consistency_run.fixed_pairs(source, ev.consistency_num, ev.seed, sigma_d)
        times = consistency_run.grid(run_cfg, tuple(ev.consistency_times))
        self.probe = consistency_run.Probe(
            t_model, pairs, times, t_mid=config.trigflow.t_mid, sigma_d=sigma_d,
            heun_steps=ev.consistency_heun_steps,
            cfg_scale=consistency_run.teacher_cfg_scale(
                consistency_run.default_cfg_scale(run_cfg, self.guidance), t_model),
            batch=ev.batch_size or 256, mesh=mesh,
            cache=self.workdir / consistency_run.REF_FILE, write=is_main_process, log=log,
        )  # fmt: skip
        log(f"periodic consistency error every {ev.consistency_every_kimg:g} kimg: {len(pairs)} "
            f"pairs, {len(times)} times, against {t_model.identity} (Heun "
            f"{ev.consistency_heun_steps} steps)")  # fmt: skip

    @classmethod
    def create(
        cls, config: ml_collections.ConfigDict, mesh: Mesh, source: Any, teacher: Any,
        workdir: str | Path, log: Callable[[str], None], is_main_process: bool = True,
    ) -> PeriodicConsistency | None:  # fmt: skip
        """The hook, or None when ``evals.consistency_every_kimg`` is 0 (off)."""
        if config.evals.consistency_every_kimg <= 0:
            return None
        return cls(config, mesh, source, teacher, workdir, log, is_main_process)

    def __call__(
        self, nd: NetworkDef, params: Any, step: int, writers: Any, is_main_process: bool = True
    ) -> dict[str, float]:
        """Measure the student ``nd`` with ``params`` (the EMA, on the mesh) and write the
        scalars (``consistency/...`` and ``consistency_time_s``), which it returns."""
        t0 = time.perf_counter()
        result = self.probe(nd.apply_fn, params, self.guidance)
        scalars = consistency.scalars(result)
        scalars["consistency_time_s"] = time.perf_counter() - t0
        if is_main_process:
            writers.write_scalars(step, scalars)
            runner.write_json(self.workdir / "eval" / f"consistency_step{step}.json", {
                "workdir": str(self.workdir), "step": step, "teacher": self.probe.teacher.identity,
                "heun_steps": self.probe.heun_steps, "guidance": self.guidance, **result,
                "time": time.time(),
            })  # fmt: skip
        names = ("1step", "2step", "2step_vs_teacher")
        shown = "  ".join(f"{name} {result[name]:.4g}" for name in names)
        self.log(f"consistency step {step}: {shown}  ({scalars['consistency_time_s']:.1f} s)")
        return scalars
