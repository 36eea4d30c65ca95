"""The consistency error of a training run: its data's pairs, its teacher, the cached reference.

``scm-jax eval --consistency`` (:func:`evaluate_run`) and the training loop
(``scm_jax.train.evals.PeriodicConsistency``) both build a :class:`Probe`: N fixed examples of
the run's data (the first N) with noise from a seed, the time grid, the teacher
(:func:`resolve_teacher`) and the teacher's endpoints for the grid
(``scm_jax.eval.consistency.reference``), computed once and cached in ``<workdir>/``
:data:`REF_FILE`. The cache is keyed by the teacher's identity (its run folder, EMA and
checkpoint step, or the exact mixture), the pairs (a sha256 of x0, z, z' and the labels: data,
N and seed), the grid, t_mid, sigma_d, the Heun steps and the teacher's CFG scale; a cache with
another key is recomputed (one line says which fields differ) and replaced atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from scm_jax import objectives, trigflow
from scm_jax.eval import consistency as cons
from scm_jax.files import atomic_write
from scm_jax.guidance import ApplyFn

REF_FILE = "consistency_ref.npz"
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class TeacherModel:
    """The teacher the student is compared with: F in the ``ApplyFn`` convention, its params
    (None for the exact mixture), what it is (``identity``: the cache key) and its classes."""

    apply_fn: ApplyFn
    params: Any
    identity: str
    num_classes: int = 0


def _checkpoint_step(folder: str | Path) -> int | None:
    """The newest checkpoint step of a run (an export's recorded step)."""
    from scm_jax.run.checkpoint import Checkpointer
    from scm_jax.run.exports import is_export, read_export_config

    if is_export(folder):
        return read_export_config(folder).get("step")
    ckpt = Checkpointer(folder, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def teacher_identity(folder: str | Path, sigma_rel: float = 0.0) -> str:
    """What a run's (or export's) teacher weights are: folder, EMA and checkpoint step."""
    from scm_jax.run.emas import ema_name_for
    from scm_jax.run.exports import is_export, read_export_config
    from scm_jax.run.layout import load_run_config

    if is_export(folder):
        ema = str(read_export_config(folder).get("ema"))
    else:
        ema = ema_name_for(load_run_config(folder), sigma_rel)
    return f"{Path(folder).resolve()} EMA {ema} step {_checkpoint_step(folder)}"


def default_cfg_scale(run_cfg: Mapping[str, Any], guidance: float | None) -> float | None:
    """The scale the student stands for: its guidance input, else a distillation run's fixed
    teacher scale (``teacher.guidance_min = guidance_max``), else None."""

    if guidance is not None or not objectives.get(run_cfg["objective"]).needs_teacher:
        return guidance
    t_cfg = run_cfg.get("teacher", {}) or {}
    g_min, g_max = float(t_cfg.get("guidance_min", 1.0)), float(t_cfg.get("guidance_max", 1.0))
    return g_min if g_min == g_max else None


def exact_teacher(run_cfg: Mapping[str, Any], where: str) -> TeacherModel:
    """The exact field of the toy mixture in ``run_cfg['dataset']`` (``scm_jax.gmm``).

    Raises:
      ValueError: the run's data is not a Gaussian mixture.
    """
    from scm_jax.gmm import GaussianMixture, teacher_apply_fn

    ds = run_cfg["dataset"]
    if any(k not in ds for k in ("means", "stds", "weights")):
        raise ValueError(f"the exact mixture teacher needs a toy_gmm run; {where} trains on "
                         f"{ds.get('source')!r} data")  # fmt: skip
    gmm = GaussianMixture.from_dict({k: ds[k] for k in ("means", "stds", "weights")})
    digest = hashlib.sha256(json.dumps(gmm.to_dict(), sort_keys=True).encode()).hexdigest()
    sigma_d = float(run_cfg["trigflow"]["sigma_d"])
    return TeacherModel(teacher_apply_fn(gmm, sigma_d), None, f"exact_gmm {digest[:16]}")


def run_teacher(
    folder: str | Path, mesh: Mesh | None, *, sigma_rel: float = 0.0, sigma_d: float,
    what: str = "teacher",
) -> TeacherModel:  # fmt: skip
    """A diffusion run's (or export's) EMA as the teacher.

    Raises:
      FileNotFoundError / ValueError / CheckpointError: not a run, not a diffusion model, another
        sigma_d, no such EMA or no readable checkpoint.
    """
    from scm_jax.networks import build_network
    from scm_jax.run.emas import load_ema_params
    from scm_jax.run.layout import load_run_config

    cfg = load_run_config(folder)
    if not objectives.is_diffusion(cfg.get("objective")):
        raise ValueError(
            f"the {what} {folder} is a {cfg.get('objective')} run; the consistency error "
            "compares with a diffusion model's PF-ODE (objective=diffusion)"
        )
    if float(cfg["trigflow"]["sigma_d"]) != sigma_d:
        raise ValueError(f"the {what} {folder} has sigma_d={cfg['trigflow']['sigma_d']}, the "
                         f"student {sigma_d}: they must agree")  # fmt: skip
    identity = teacher_identity(folder, sigma_rel)
    params, cfg, _ = load_ema_params(folder, None, mesh, sigma_rel=sigma_rel, what=what,
                                     step=_checkpoint_step(folder))  # fmt: skip
    nd = build_network({**cfg["model"], "dropout": 0.0})
    return TeacherModel(nd.apply_fn, params, identity, nd.num_classes)


def resolve_teacher(
    run_cfg: Mapping[str, Any], workdir: str | Path, teacher: str | None, mesh: Mesh | None, *,
    loaded: Any = None,
) -> TeacherModel:  # fmt: skip
    """The teacher of the run in ``workdir``.

    In order: ``teacher`` (a diffusion run's folder, or ``'exact_gmm'``: the toy's exact mixture);
    a distillation run's own teacher (``teacher.kind = 'exact_gmm'``, else ``teacher.workdir``
    with its ``teacher.ema_std``; ``loaded``: that teacher already in memory, a
    ``scm_jax.train.teacher.Teacher``); ``init_from`` when it is a diffusion run (sCT from a
    teacher); a diffusion run itself (the teacher as its own student).

    Raises:
      ValueError: none of these (the message says to pass ``--teacher``), or a teacher that
        cannot serve (see :func:`run_teacher`).
    """
    from scm_jax.run.layout import load_run_config

    sigma_d = float(run_cfg["trigflow"]["sigma_d"])
    if teacher == "exact_gmm":
        return exact_teacher(run_cfg, str(workdir))
    if teacher:
        return run_teacher(teacher, mesh, sigma_d=sigma_d)
    objective, t_cfg = run_cfg["objective"], run_cfg.get("teacher", {}) or {}
    if objectives.get(objective).needs_teacher:
        if t_cfg.get("kind") == "exact_gmm":
            return exact_teacher(run_cfg, str(workdir))
        if t_cfg.get("workdir"):
            sigma_rel = float(t_cfg.get("ema_std", 0.0) or 0.0)
            if loaded is not None:  # the same weights load_teacher loaded
                n = 0 if loaded.nd is None else loaded.nd.num_classes
                identity = teacher_identity(t_cfg["workdir"], sigma_rel)
                return TeacherModel(loaded.apply_fn, loaded.params, identity, n)
            return run_teacher(t_cfg["workdir"], mesh, sigma_rel=sigma_rel, sigma_d=sigma_d)
    init_from = run_cfg.get("init_from") or ""
    if init_from and objectives.is_diffusion(load_run_config(init_from).get("objective")):
        return run_teacher(init_from, mesh, sigma_d=sigma_d, what="init_from teacher")
    if objectives.is_diffusion(objective):
        return run_teacher(workdir, mesh, sigma_d=sigma_d, what="run")
    raise ValueError(
        f"{workdir} ({objective}) names no teacher to compare with: pass --teacher DIR (a "
        "diffusion run), or --teacher exact_gmm for a toy mixture run"
    )


def fixed_pairs(source: Any, num: int, seed: int, sigma_d: float) -> cons.Pairs:
    """The first ``num`` examples of a data source (``take``) with z, z' from ``seed``.

    Raises:
      ValueError: num < 1 or more than the source holds.
    """
    if num < 1:
        raise ValueError(f"the consistency error needs num >= 1 pairs, got {num}")
    if num > len(source):
        raise ValueError(f"{num} consistency pairs, but the run's data holds {len(source)} "
                         "examples; use fewer")  # fmt: skip
    x0, labels = source.take(np.arange(num))
    return cons.make_pairs(x0, labels, seed, sigma_d)


# ------------------------------------------------------------------------- the cache


def cache_key(
    teacher: TeacherModel, pairs: cons.Pairs, times: tuple[float, ...], *, t_mid: float,
    sigma_d: float, heun_steps: int, cfg_scale: float | None,
) -> dict[str, Any]:  # fmt: skip
    """What a cached reference is valid for (JSON-ready)."""
    return {"teacher": teacher.identity, "pairs": pairs.fingerprint(), "num": len(pairs),
            "times": [round(t, 6) for t in times], "t_mid": round(t_mid, 6), "sigma_d": sigma_d,
            "heun_steps": heun_steps, "cfg_scale": cfg_scale}  # fmt: skip


def load_reference(path: Path, key: Mapping[str, Any]) -> tuple[dict | None, str]:
    """``(reference, '')`` from a matching cache file, else ``(None, why not)``; the reference is
    ``{'phi': (K, N, ...), 'ideal_2step': (N, ...)}`` float32 (``consistency.reference``)."""
    if not path.is_file():
        return None, ""
    try:
        with np.load(path) as f:
            found = json.loads(str(f["key"]))
            ref = {"phi": f["phi"], "ideal_2step": f["ideal_2step"]}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}); recomputing it"
    differ = sorted(k for k in set(found) | set(key) if found.get(k) != key.get(k))
    if differ:
        return None, f"{path} was computed for another {', '.join(differ)}; recomputing it"
    return ref, ""


def save_reference(path: Path, key: Mapping[str, Any], ref: Mapping[str, np.ndarray]) -> None:
    """Write the cache atomically (a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, key=np.asarray(json.dumps(dict(key), sort_keys=True)), **ref)


class Probe:
    """Fixed pairs, grid and teacher of one run; call it with a student to get its errors.

    Args:
      teacher: :class:`TeacherModel`; pairs: :class:`consistency.Pairs`; times: the grid.
      t_mid, sigma_d, heun_steps, cfg_scale: as ``consistency.reference``.
      batch: examples per call (rounded up to a multiple of the mesh's batch devices).
      mesh: the pairs are batch-sharded over it (None: one device).
      cache: the reference file (None: not cached); write: whether this process writes it.
      log: console lines (a recomputed cache says why).
    """

    def __init__(
        self, teacher: TeacherModel, pairs: cons.Pairs, times: tuple[float, ...], *,
        t_mid: float, sigma_d: float, heun_steps: int = cons.DEFAULT_HEUN_STEPS,
        cfg_scale: float | None = None, batch: int = 256, mesh: Mesh | None = None,
        cache: Path | None = None, write: bool = True, log: Log = print,
    ) -> None:  # fmt: skip
        from scm_jax.sharding import batch_sharding

        if heun_steps < 1:
            raise ValueError(f"the consistency reference needs heun_steps >= 1, got {heun_steps}")
        self.teacher, self.pairs, self.times = teacher, pairs, times
        self.t_mid, self.sigma_d, self.heun_steps = float(t_mid), float(sigma_d), int(heun_steps)
        self.cfg_scale = None if cfg_scale is None else float(cfg_scale)
        self.sharding = None if mesh is None else batch_sharding(mesh)
        self.batch = int(batch)  # rounded up to the batch shards by consistency.reference
        self.cache, self.write, self.log = cache, write, log
        self.key = cache_key(teacher, pairs, times, t_mid=self.t_mid, sigma_d=self.sigma_d,
                             heun_steps=self.heun_steps, cfg_scale=self.cfg_scale)  # fmt: skip
        self._ref: dict[str, np.ndarray] | None = None
        self.reference_source = ""  # 'cached' or 'computed in S s'
        self._fns: dict = {}

    @property
    def reference(self) -> dict[str, np.ndarray]:
        """The teacher's endpoints: read from the cache, else computed (and cached)."""
        if self._ref is None:
            note = ""
            if self.cache is not None:
                self._ref, note = load_reference(self.cache, self.key)
                self.reference_source = "cached" if self._ref is not None else ""
            if note:
                self.log(f"consistency: {note}")
            if self._ref is None:
                nfe = len(self.pairs) * (len(self.times) + 1) * (2 * self.heun_steps - 1)
                self.log(f"consistency: solving the teacher's PF-ODE for the endpoints ({nfe} "
                         "evaluations, once; later evaluations reuse them) ...")  # fmt: skip
                t0 = time.perf_counter()
                self._ref = cons.reference(
                    self.teacher.apply_fn, self.teacher.params, self.pairs, self.times,
                    t_mid=self.t_mid, sigma_d=self.sigma_d, heun_steps=self.heun_steps,
                    cfg_scale=self.cfg_scale, batch=self.batch, sharding=self.sharding,
                )  # fmt: skip
                seconds = time.perf_counter() - t0
                self.reference_source = f"computed in {seconds:.1f} s"
                if self.cache is not None and self.write:
                    save_reference(self.cache, self.key, self._ref)
                where = f", cached in {self.cache}" if self.cache and self.write else ""
                self.log(f"consistency: teacher reference ({nfe} teacher evaluations) computed "
                         f"in {seconds:.1f} s{where}")  # fmt: skip
        return self._ref

    def __call__(self, student_fn: ApplyFn, params: Any, guidance: float | None) -> dict:
        """:func:`consistency.evaluate` of the student F (``guidance``: its guidance input)."""
        return cons.evaluate(
            student_fn, params, self.teacher.apply_fn, self.teacher.params, self.pairs,
            self.reference, self.times, t_mid=self.t_mid, sigma_d=self.sigma_d,
            heun_steps=self.heun_steps, guidance=guidance, cfg_scale=self.cfg_scale,
            batch=self.batch, sharding=self.sharding, fns=self._fns,
        )  # fmt: skip


def teacher_cfg_scale(guidance: float | None, teacher: TeacherModel) -> float | None:
    """The teacher's CFG scale for a student guidance input: the same scale for a
    class-conditional teacher (None at 1, the plain conditional model), else None."""
    if guidance is None or not teacher.num_classes or guidance == 1.0:
        return None
    return float(guidance)


def grid(run_cfg: Mapping[str, Any], times: Any = ()) -> tuple[float, ...]:
    """The run's grid: ``times`` (t_max and t_mid added), or :func:`consistency.default_times`."""
    tf = run_cfg["trigflow"]
    t_max = trigflow.t_max(float(tf["sigma_max"]), float(tf["sigma_d"]))
    if times:
        return cons.check_times(times, t_max, float(tf["t_mid"]))
    return cons.default_times(float(tf["sigma_d"]), float(tf["sigma_max"]), float(tf["t_mid"]))


def evaluate_run(
    workdir: str | Path, *, num: int = 256, teacher: str | None = None, times: Any = (),
    heun_steps: int = cons.DEFAULT_HEUN_STEPS, ema: str | None = None, step: int | None = None,
    seed: int = 0, guidance: float | None = None, batch: int = 256, mesh: Mesh | None = None,
    log: Log = print,
) -> dict[str, Any]:  # fmt: skip
    """The consistency error of a run's EMA model (what ``scm-jax eval --consistency`` runs).

    Args:
      workdir: a training run (a diffusion run is measured as its own student).
      num: pairs (the first ``num`` examples of the run's data); teacher: see
        :func:`resolve_teacher`; times: the grid (default ``consistency.default_times``).
      heun_steps: Heun steps of the teacher's solves; seed: z and z'.
      ema, step: which EMA and checkpoint (default: the run's first EMA, the latest).
      guidance: the student's guidance input (default: the middle of its training range) and the
        teacher's CFG scale.
      batch, mesh: examples per call; devices (default: all, on the 'data' axis).
    Returns:
      JSON-ready: ``workdir``, ``objective``, ``step``, ``ema``, ``teacher``, ``heun_steps``,
      ``seed``, ``t_mid``, ``guidance``, ``cfg_scale``, ``devices``, ``reference`` ('cached' or
      how long it took), ``seconds`` and the fields of ``consistency.evaluate``.
    Raises:
      FileNotFoundError / ValueError / CheckpointError: the run, its checkpoint, teacher or data.
    """
    from scm_jax.data.sources import load_dataset
    from scm_jax.run.checkpoint import CheckpointError
    from scm_jax.run.emas import ema_name_for
    from scm_jax.run.layout import load_run_config
    from scm_jax.run.sampler import load_sampler
    from scm_jax.sharding import make_mesh

    run_cfg = load_run_config(workdir)
    if num < 1 or heun_steps < 1:
        raise ValueError(f"--num ({num}) and --heun-steps ({heun_steps}) must be >= 1")
    t_grid = grid(run_cfg, times)
    step = _checkpoint_step(workdir) if step is None else step
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {workdir}: train the run first")
    mesh = make_mesh(-1, 1) if mesh is None else mesh
    ema_name = ema_name_for(run_cfg, 0.0, ema)
    sampler = load_sampler(workdir, ema=ema_name, step=step, mesh=mesh)
    if guidance is not None and not sampler.nd.guidance_input:
        raise ValueError("this model has no guidance input; do not pass guidance")
    g_value = (sampler.guidance if guidance is None else float(guidance)) if (
        sampler.nd.guidance_input) else None  # fmt: skip
    t_model = resolve_teacher(run_cfg, workdir, teacher, mesh)
    cfg_scale = teacher_cfg_scale(default_cfg_scale(run_cfg, g_value), t_model)
    sigma_d = sampler.sigma_d
    t0 = time.perf_counter()
    source = load_dataset(run_cfg["dataset"], sigma_d=sigma_d, seed=run_cfg.get("seed", 0))
    pairs = fixed_pairs(source, num, seed, sigma_d)
    probe = Probe(t_model, pairs, t_grid, t_mid=sampler.t_mid, sigma_d=sigma_d,
                  heun_steps=heun_steps, cfg_scale=cfg_scale, batch=batch, mesh=mesh,
                  cache=Path(workdir) / REF_FILE, log=log)  # fmt: skip
    log(f"consistency: {num} pairs, {len(t_grid)} times, teacher {t_model.identity}, Heun "
        f"{heun_steps} steps ({2 * heun_steps - 1} NFE)")  # fmt: skip
    result = probe(sampler.nd.apply_fn, sampler.params, g_value)
    return {
        "workdir": str(workdir), "objective": run_cfg["objective"], "step": int(step),
        "ema": ema_name, "teacher": t_model.identity, "heun_steps": heun_steps, "seed": seed,
        "t_mid": sampler.t_mid, "guidance": g_value, "cfg_scale": cfg_scale,
        "devices": mesh.size, "reference": probe.reference_source,
        "seconds": time.perf_counter() - t0, **result, "time": time.time(),
    }  # fmt: skip
