"""FID of a model's samples: ``sample_stats`` and ``evaluate`` (what ``scm-jax eval`` runs).

  r = sample_stats(sampler, 2, 50_000, features=ext, mesh=mesh)      # samples made on device
  result = evaluate("runs/c10_scd", steps=(1, 2), num=50_000, ref_path="c10_train.npz",
                    teacher_nfe=35)

Samples are generated batch-sharded on the mesh, timed on their own, then quantised and
featurised through ``scm_jax.eval.features.FeaturePipeline`` like a dataset's images.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from scm_jax import objectives
from scm_jax.eval import feature_stats, fid
from scm_jax.eval.features import (
    DEFAULT_CONVENTION,
    FeatureExtractor,
    FeaturePipeline,
    ImageProgress,
    Log,
    as_pipeline,
    check_image_shape,
    check_num,
    check_reference,
    compile_once,
    default_batch_size,
    load_extractor,
)
from scm_jax.eval.inception import DEFAULT_RESIZE
from scm_jax.files import write_json_atomic
from scm_jax.sharding import make_mesh


def _print(line: str) -> None:
    print(line, flush=True)


# ----------------------------------------------------------------------------------- samples


class SampleStats(NamedTuple):
    """Statistics of a model's samples and how long they took (seconds, compilation apart)."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    n: int
    sampling_seconds: float  # generating the samples, blocked until ready
    feature_seconds: float  # quantising, Inception, statistics
    compile_seconds: float  # both functions, compiled ahead of the timed loop
    nfe: int  # network evaluations per sample (x2 with classifier-free guidance)


def sample_stats(
    sampler: Any, steps: int, num: int, *, features: FeatureExtractor | FeaturePipeline,
    mesh: Mesh | None = None, batch_size: int | None = None, seed: int = 0,
    labels: int | None = None,
    guidance: float | None = None, log: Log = _print, what: str = "samples",
) -> SampleStats:  # fmt: skip
    """Feature statistics of ``num`` samples generated on device, batch-sharded over the mesh.

    Each batch is sampled (timed until ready), then quantised and featurised (timed
    separately); both functions are compiled before the timed loop.

    Args:
      sampler: a ``scm_jax.run.sampler.Sampler`` whose parameters live on the mesh's devices
        (``load_sampler(..., mesh=mesh)``, or a training state's EMA).
      steps: network evaluations (consistency models) or EDM Heun steps (diffusion runs).
      num: number of samples, >= 2 (the last batch is generated whole and masked).
      features, mesh, batch_size: as :func:`dataset_stats`.
      seed: batch i uses ``fold_in(key(seed), i)``.
      labels: class-conditional models: None = balanced (sample j gets class j % K), or one class.
      guidance: as ``Sampler.sample`` (None: the model's default).
      log, what: progress lines, naming the setting.
    Returns:
      :class:`SampleStats`.
    Raises:
      ValueError: num < 2, a model that does not make images, bad labels or guidance.
    """
    check_image_shape(sampler.shape, "this model")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    pipe = as_pipeline(features, mesh, batch_size)
    check_num(num, pipe.extractor.dim, what, log)
    b, k = pipe.batch, sampler.nd.num_classes
    batches = math.ceil(num / b)
    fixed, g = sampler.batch_inputs(None if labels is None else [labels] * b, b, guidance)
    key = jax.random.key(seed)

    def inputs(i: int) -> tuple[Any, ...]:
        y = fixed
        if y is not None and labels is None:
            y = ((np.arange(b) + i * b) % k).astype(np.int32)
        shardings = (pipe.replicated, pipe.sharding, pipe.sharding)
        return jax.device_put((jax.random.fold_in(key, i), y, g), shardings)

    args = inputs(0)
    fn = sampler.batch_fn(steps, b, pipe.sharding)
    sample_fn, compile_s = compile_once(fn, sampler.params, *args)
    stats = pipe.init()
    images = jax.ShapeDtypeStruct((b, *sampler.shape), jnp.float32, sharding=pipe.sharding)
    compile_s += pipe.compile(stats, images, jax.device_put(np.ones(b, bool), pipe.sharding))
    log(f"  {what}: compiled in {compile_s:.1f} s; {batches} batch(es) of {b} on {pipe.mesh.size} "
        "device(s)")  # fmt: skip
    progress = ImageProgress(what, num, log)
    t_sample = t_feat = 0.0
    for i in range(batches):
        t0 = time.perf_counter()
        x = jax.block_until_ready(sample_fn(sampler.params, *args))
        t1 = time.perf_counter()
        mask = jax.device_put(np.arange(b) + i * b < num, pipe.sharding)
        stats = jax.block_until_ready(pipe(stats, x, mask))
        t_sample, t_feat = t_sample + t1 - t0, t_feat + time.perf_counter() - t1
        if i + 1 < batches:
            args = inputs(i + 1)
        done = min((i + 1) * b, num)
        progress(done, f"  sampling {done / t_sample:.3g} img/s" if done == num else "")
    mu, sigma, n = feature_stats.finalize(stats)
    return SampleStats(mu, sigma, n, t_sample, t_feat, compile_s, sampler.nfe(steps))


# --------------------------------------------------------------------------------- evaluate


def heun_steps(nfe: int) -> int:
    """EDM Heun steps N for an odd NFE = 2N - 1 (ValueError otherwise)."""
    if nfe < 1 or nfe % 2 == 0:
        raise ValueError(
            f"teacher NFE {nfe}: the EDM Heun sampler makes 2N - 1 evaluations for N steps, so "
            "the NFE must be odd (e.g. 35 for 18 steps, 79 for 40)"
        )
    return (nfe + 1) // 2


@dataclasses.dataclass
class Setting:
    """One thing to evaluate: a sampler at a step count with a guidance value."""

    name: str  # '1step', 'heun18', 'teacher_heun18'
    sampler: Any
    steps: int
    model: str  # what it is, for the report
    guidance: float | None  # passed to the sampler (a CFG scale of 1 is run as None)
    guidance_reported: float | None


def run_settings(
    settings: Sequence[Setting], num: int, ref: fid.StatsTuple, pipe: FeaturePipeline, *,
    seed: int = 0, source: str = "", log: Log = _print,
) -> list[dict[str, Any]]:  # fmt: skip
    """Sample, featurise and compare with ``ref`` every setting; one result dict each (see
    :func:`evaluate`)."""
    results, shown = [], set()
    for st in settings:
        log(f"{st.name}: {num} samples from {st.model} ({st.sampler.nfe(st.steps)} NFE)")
        r = sample_stats(st.sampler, st.steps, num, features=pipe, seed=seed,
                         guidance=st.guidance, log=log, what=st.name)  # fmt: skip
        meta = pipe.extractor.meta(f"{source} {st.name}".strip(), num_steps=st.steps)
        meta["path"] = f"the {st.name} samples"  # names them in notes
        value, notes = fid.fid_from_stats(ref, (r.mu, r.sigma, r.n, meta), warn=False)
        results.append({
            "setting": st.name, "model": st.model, "steps": st.steps, "nfe": r.nfe,
            "guidance": st.guidance_reported, "fid": value, "num": r.n,
            "sampling_seconds": r.sampling_seconds,
            "images_per_s": r.n / max(r.sampling_seconds, 1e-12),
            "feature_seconds": r.feature_seconds, "compile_seconds": r.compile_seconds,
            "notes": notes,
        })  # fmt: skip
        log(f"{st.name}: FID {value:.4g}  ({r.nfe} NFE, sampling {r.sampling_seconds:.1f} s)")
        for note in notes:  # each once; the samples' own count was noted by sample_stats
            generic = note.replace(meta["path"], "the samples")
            if not generic.startswith("the samples:") and generic not in shown:
                shown.add(generic)
                log(f"  note: {note}")
    return results


def make_setting(name: str, sampler: Any, steps: int, model: str, g: float | None) -> Setting:
    """A checked setting: guidance the model cannot take fails here, before any sampling."""
    g_run = None if objectives.is_diffusion(sampler.objective) and g == 1.0 else g
    sampler.batch_inputs(None, 1, g_run)
    if sampler.nd.guidance_input and g is None:
        g = sampler.guidance
    return Setting(name, sampler, steps, model, g_run, g)


def evaluate(
    workdir: str | os.PathLike, steps: Iterable[int] | None = None, num: int = 50_000, *,
    ref_path: str | os.PathLike, guidance: float | None = None, teacher_nfe: int | None = None,
    teacher_workdir: str | os.PathLike | None = None, inception_path: str | None = None,
    extractor: FeatureExtractor | None = None, resize: str | None = None,
    convention: str | None = None, ema: str | None = None, step: int | None = None,
    batch_size: int | None = None, seed: int = 0, mesh: Mesh | None = None, log: Log = _print,
) -> dict[str, Any]:  # fmt: skip
    """FID of a run's EMA model at each step count (and of its teacher at ``teacher_nfe``).

    Everything that can be wrong is checked before sampling: the run and its checkpoint, the
    reference file and its feature size, the weights, steps, NFE, num and guidance.

    Args:
      workdir: a training run, or an export folder (``scm-jax export`` / ``phema`` /
        ``import-edm2``: its one EMA; ``step`` is the one it records). Consistency runs: each of
        ``steps`` (default (1, 2)); diffusion runs: ``steps`` must be empty and ``teacher_nfe``
        given (its own EMA with EDM Heun).
      num: samples per setting (>= 2; 50k is standard).
      ref_path: reference statistics (``scm-jax fid-stats``); their recorded resize and input
        convention are used unless ``resize`` / ``convention`` say otherwise.
      guidance: the student's guidance input and the teacher's CFG scale (None: a guided
        student's default, and the same scale for its teacher; unguided models: none).
      teacher_nfe: also evaluate the teacher (sCD: the run's ``teacher.workdir`` and
        ``teacher.ema_std``, or ``teacher_workdir`` and its first EMA) with EDM Heun at this
        odd NFE.
      inception_path / extractor: the weights (:func:`resolve_inception_path`), or a ready
        extractor (tests).
      ema, step: which EMA and checkpoint (default: the run's first EMA, latest checkpoint).
      batch_size, seed, mesh: samples per call (default :func:`default_batch_size`), sampling
        seed, devices (default: all, on the 'data' axis).
      log: progress lines.
    Returns:
      JSON-ready dict: ``workdir``, ``objective``, ``step``, ``ema``, ``num``, ``seed``, ``ref``,
      ``inception`` (the statistics metadata), ``devices``, ``batch_size``, ``time`` and
      ``results``: one dict per setting with ``setting``, ``model``, ``steps``, ``nfe``,
      ``guidance``, ``fid``, ``num``, ``sampling_seconds``, ``images_per_s``,
      ``feature_seconds``, ``compile_seconds``, ``notes``.
    Raises:
      FileNotFoundError / ValueError / CheckpointError: missing run, checkpoints, weights or
        reference; another feature size; bad steps, NFE, num or guidance.
    """
    from scm_jax.networks import build_network
    from scm_jax.run.checkpoint import Checkpointer, CheckpointError
    from scm_jax.run.emas import ema_of
    from scm_jax.run.exports import is_export
    from scm_jax.run.layout import load_run_config
    from scm_jax.run.sampler import load_sampler

    run_cfg = load_run_config(workdir)
    export = is_export(workdir)
    objective = run_cfg["objective"]
    steps = tuple(int(s) for s in (steps or ()))
    if objectives.is_diffusion(objective) and (steps or not teacher_nfe):
        raise ValueError(
            f"{workdir} is a diffusion run: evaluate it with the Heun sampler at an odd NFE "
            "(--teacher-nfe 35 = 18 steps), not with consistency step counts (--steps)"
        )
    steps = steps or ((1, 2) if not objectives.is_diffusion(objective) else ())
    if any(s < 1 for s in steps):
        raise ValueError(f"steps must be >= 1, got {list(steps)}")
    if num < 2:
        raise ValueError(f"FID statistics need at least 2 samples, got num={num}")
    heun = heun_steps(teacher_nfe) if teacher_nfe else None
    if export:  # one set of weights (scm-jax export / phema / import-edm2); no dataset section
        check_image_shape(build_network(run_cfg["model"]).sample_shape, f"the export {workdir}")
        ema_name = ema_of(workdir, run_cfg, ema=ema, step=step)
        step = int(run_cfg.get("step") or 0)
    else:
        check_image_shape(tuple(run_cfg["dataset"]["shape"]), f"the run in {workdir}")
        ckpt = Checkpointer(workdir, read_only=True)
        try:
            newest = ckpt.latest_step()
        finally:
            ckpt.close()
        if newest is None:
            raise CheckpointError(f"no complete checkpoint in {workdir}: train the run first")
        ema_name = ema_of(workdir, run_cfg, ema=ema)
    ref = fid.load_stats(ref_path)
    resize = resize or ref[3].get("resize") or DEFAULT_RESIZE
    convention = convention or ref[3].get("input_convention") or DEFAULT_CONVENTION
    if extractor is None:
        extractor = load_extractor(inception_path, resize, convention)
    check_reference(ref, extractor.dim)
    mesh = make_mesh(-1, 1) if mesh is None else mesh
    batch_size = batch_size or default_batch_size()

    # without --step: the newest readable checkpoint (past damaged ones, with a warning)
    sampler = load_sampler(workdir, ema=ema_name, step=None if export else step,
                           batch_size=batch_size, mesh=mesh)  # fmt: skip
    if not export and sampler.step is not None:
        step = sampler.step  # the step whose weights were restored
    settings = [make_setting(f"{s}step", sampler, s, f"EMA {ema_name}", guidance) for s in steps]
    if heun is not None and objectives.is_diffusion(objective):
        settings.append(make_setting(f"heun{heun}", sampler, heun, f"EMA {ema_name}", guidance))
    elif heun is not None:
        tdir = teacher_workdir or run_cfg.get("teacher", {}).get("workdir", "")
        if not tdir:
            raise ValueError(
                f"{workdir} ({objective}) names no teacher: pass --teacher DIR (a diffusion run) "
                "to compare with one"
            )
        t_cfg = load_run_config(tdir)
        if not objectives.is_diffusion(t_cfg["objective"]):
            raise ValueError(f"the teacher {tdir} is a {t_cfg['objective']} run, not diffusion")
        sigma_rel = 0.0 if teacher_workdir else float(run_cfg["teacher"].get("ema_std", 0) or 0)
        t_ema = ema_of(tdir, t_cfg, sigma_rel=sigma_rel)
        teacher = load_sampler(tdir, ema=t_ema, batch_size=batch_size, mesh=mesh)
        g_teacher = guidance
        if g_teacher is None and sampler.nd.guidance_input:
            g_teacher = sampler.guidance  # the CFG scale the student's default input stands for
        if g_teacher is not None and not teacher.nd.num_classes:
            raise ValueError(f"guidance {g_teacher} for the unconditional teacher in {tdir}")
        what = f"teacher {tdir} (EMA {t_ema})"
        settings.append(make_setting(f"teacher_heun{heun}", teacher, heun, what, g_teacher))

    pipe = FeaturePipeline(extractor, mesh, batch_size)
    results = run_settings(settings, num, ref, pipe, seed=seed, source=f"{workdir} step {step}",
                           log=log)  # fmt: skip
    return {
        "workdir": str(workdir), "objective": objective, "step": int(step), "ema": ema_name,
        "num": num, "seed": seed,
        "ref": {"path": str(ref_path), "n": ref[2], "source": ref[3].get("source")},
        "inception": extractor.meta(f"{workdir} step {step}"), "devices": mesh.size,
        "batch_size": pipe.batch, "results": results, "time": time.time(),
    }  # fmt: skip


def write_json(path: str | os.PathLike, result: dict) -> Path:
    """Write ``result`` as indented JSON (parent folders created; ``scm_jax.files``: replaced
    whole or not at all)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, result, indent=2)
