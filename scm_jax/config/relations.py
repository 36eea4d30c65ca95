"""The cross-field rules of config validation (``scm_jax.config.validate``): each takes a config (a
plain dict) and ``check_paths`` and returns its problems, one line each. :data:`RELATIONS` is the
list ``problems`` runs; ``scm_jax.config.validate.register_relation`` adds to it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from scm_jax import objectives
from scm_jax.config import durations as config_durations
from scm_jax.config.tables import FIELDS, SECTIONS
from scm_jax.run.layout import CONFIG_FILE as RUN_CONFIG

Relation = Callable[[Mapping[str, Any], bool], "list[str]"]  # (config, check_paths) -> problems


def _objective(cfg: Mapping[str, Any]) -> objectives.Objective | None:
    """The config's entry of the objective table, or None for a missing or unknown name (which
    the field checks report)."""
    name = cfg.get("objective")
    return objectives.get(name) if objectives.known(name) else None


def _sections_read(objective: objectives.Objective | None) -> tuple[str, ...]:
    """The config sections whose durations the objective's training reads."""
    return ("loss",) if objective is None else tuple({"loss", objective.validation_section})


def _ok(cfg: Mapping[str, Any], *paths: str) -> bool:
    """Whether the dotted fields exist and passed their own checks (relations skip the rest)."""
    for path in paths:
        node: Any = cfg
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return False
            node = node[part]
        section, _, key = path.rpartition(".")
        table = SECTIONS.get(section, {}) if section else FIELDS
        check = table.get(key) or table.get(f"?{key}")
        if check is not None and check(node):
            return False
    return True


def _times(cfg: Mapping[str, Any], check_paths: bool) -> list[str]:
    if not _ok(cfg, "trigflow.t_mid", "trigflow.sigma_max", "trigflow.sigma_d"):
        return []
    tf = cfg["trigflow"]
    t_max = math.atan(tf["sigma_max"] / tf["sigma_d"])
    if tf["t_mid"] >= t_max:
        return [f"trigflow.t_mid={tf['t_mid']!r}: must be in (0, t_max) = (0, {t_max:.5f}) "
                "(t_max = arctan(sigma_max / sigma_d))"]  # fmt: skip
    return []


def _batch(cfg: Mapping[str, Any], check_paths: bool) -> list[str]:
    if not _ok(cfg, "batch_size", "train.micro_batches"):
        return []
    b, k = cfg["batch_size"], cfg["train"]["micro_batches"]
    if b % k:
        return [f"batch_size={b} is not divisible by train.micro_batches={k}; choose "
                "micro_batches that divide the batch (docs/training.md#memory-levers)"]  # fmt: skip
    return []


def _data_and_network(cfg: Mapping[str, Any], check_paths: bool) -> list[str]:
    out: list[str] = []
    if not _ok(cfg, "dataset.shape", "model.arch"):
        return out
    shape, model = tuple(cfg["dataset"]["shape"]), cfg["model"]
    keys = ("img_resolution", "img_channels") if model["arch"] == "edm2_unet" else ("data_dim",)
    if all(_ok(cfg, f"model.{k}") and k in model for k in keys):
        if model["arch"] == "edm2_unet":
            want = (model["img_resolution"], model["img_resolution"], model["img_channels"])
        else:
            want = (model["data_dim"],)
        if shape != want:
            out.append(f"dataset.shape={shape} but the network takes {want} (model."
                       f"{' / model.'.join(keys)}); make them match")  # fmt: skip
    k_model = model.get("num_classes", 0)
    if _ok(cfg, "dataset.num_classes", "model.num_classes") and k_model:
        if cfg["dataset"]["num_classes"] != k_model:
            out.append(f"model.num_classes={k_model} but dataset.num_classes="
                       f"{cfg['dataset']['num_classes']}: a class-conditional network needs "
                       "the data's labels (set both to the number of classes)")  # fmt: skip
    if _ok(cfg, "dataset.flip") and cfg["dataset"]["flip"] and len(shape) != 3:
        out.append(f"dataset.flip=True needs images (H, W, C), but dataset.shape={shape}")
    return out + _normalization(cfg)


def _normalization(cfg: Mapping[str, Any]) -> list[str]:
    """dataset.normalize='per_channel' needs one mean and std per channel (not for latents)."""
    if not _ok(cfg, "dataset.normalize", "dataset.mean", "dataset.std", "dataset.source"):
        return []
    ds = cfg["dataset"]
    c = ds["shape"][-1] if ds.get("shape") else 0
    out = []
    for key in ("mean", "std"):
        if len(ds[key]) not in (0, c):
            out.append(f"dataset.{key} has {len(ds[key])} values but the data has {c} channels "
                       "(the last axis of dataset.shape); give one per channel")  # fmt: skip
    if ds["normalize"] == "none":
        return out
    if ds["source"] == "latents":
        out.append("dataset.normalize='per_channel' with source 'latents': latents are already "
                   "normalised by dataset.latent_mean / latent_std; set dataset.normalize="
                   "'none'")  # fmt: skip
    elif not ds["mean"] or not ds["std"]:
        out.append(
            "dataset.normalize='per_channel' needs dataset.mean and dataset.std (one "
            "value per channel); measure them with `scm-jax data-stats --config ...`"
        )
    return out


def _durations(cfg: Mapping[str, Any], check_paths: bool) -> list[str]:
    """Each duration in one unit only; the tangent warm-up and the DMD start within the run."""
    objective = _objective(cfg)
    if not _ok(cfg, "total_kimg", "batch_size"):
        return []
    out: list[str] = []
    total = config_durations.total_steps(cfg)
    for section, *fields in config_durations.STEP_DURATIONS:
        sec = cfg.get(section)
        if not isinstance(sec, Mapping) or not all(_ok(cfg, f"{section}.{f}") for f in fields
                                                   if f in sec):  # fmt: skip
            continue
        given = [f for f in fields if sec.get(f)]
        if len(given) > 1:
            names = " and ".join(f"{section}.{f}" for f in given)
            out.append(f"{names} are both set; give the duration in one unit (steps, kimg or "
                       "fraction of the run) and set the others to 0")  # fmt: skip
            continue
        if section not in _sections_read(objective):  # e.g. dmd.start_* of an sCD config
            continue
        steps = config_durations.duration_steps(cfg, section, *fields)
        if section == "loss" and objective and objective.scm_term and steps > total:
            out.append(
                f"the tangent warm-up ({steps} steps, {given[0] if given else fields[0]})"
                f" is longer than the run ({total} steps = total_kimg "
                f"{cfg['total_kimg']:g} at batch {cfg['batch_size']}); shorten it, e.g. "
                "--config.loss.tangent_warmup_fraction=0.1 (and the other units 0)"
            )
        if section == "loss":
            continue
        if steps > total:  # dmd.start_*
            out.append(f"dmd start ({steps} steps) is after the end of the run ({total} steps): "
                       "the DMD term would never act; lower dmd.start_*")  # fmt: skip
    if _ok(cfg, "ema.halflife_kimg") and cfg["ema"].get("halflife_fraction"):
        if cfg["ema"]["halflife_kimg"]:
            out.append("ema.halflife_kimg and ema.halflife_fraction are both set; give the EMA "
                       "half-life in one unit and set the other to 0")  # fmt: skip
    return out


def _teacher(cfg: Mapping[str, Any], check_paths: bool) -> list[str]:
    if not _ok(cfg, "objective", "teacher.guidance_min", "teacher.guidance_max"):
        return []
    t = cfg["teacher"]
    out = []
    if t["guidance_min"] > t["guidance_max"]:
        out.append(f"teacher.guidance_min={t['guidance_min']!r} > teacher.guidance_max="
                   f"{t['guidance_max']!r}: the CFG scale is drawn from [min, max]")  # fmt: skip
    objective = _objective(cfg)  # the sCM step's teacher (DMD / rCM: _dmd)
    if not (objective and objective.needs_teacher and not objective.critic):
        return out
    if t.get("kind") == "exact_gmm":
        return out
    if not t["workdir"]:
        out.append(
            "sCD needs a teacher: set --config.teacher.workdir=DIR to the workdir of a diffusion "
            "run of the same architecture, trained with `scm-jax train --config "
            "<config>:objective=diffusion --workdir DIR`"
        )
    elif check_paths and not (Path(t["workdir"]) / RUN_CONFIG).is_file():
        out.append(f"teacher.workdir {t['workdir']!r} is not a training run's folder (no "
                   f"{RUN_CONFIG}); point it at the --workdir of a diffusion run")  # fmt: skip
    return out


def _snapshots(cfg: Mapping[str, Any], check_paths: bool) -> list[str]:
    if not _ok(cfg, "ema.snapshot_every_kimg", "ema.power_std"):
        return []
    ema = cfg["ema"]
    if ema["snapshot_every_kimg"] > 0 and not ema["power_std"]:
        every = ema["snapshot_every_kimg"]
        return [
            f"ema.snapshot_every_kimg={every}: post-hoc EMA snapshots are of the power-function "
            "EMAs, but ema.power_std is empty; set e.g. --config.ema.power_std=0.05,0.1 or "
            "--config.ema.snapshot_every_kimg=0"
        ]
    return []


def _evals(cfg: Mapping[str, Any], check_paths: bool) -> list[str]:
    if not _ok(cfg, "evals.every_kimg", "evals.teacher_nfe"):
        return []
    ev, out = cfg["evals"], []
    if ev["teacher_nfe"] and ev["teacher_nfe"] % 2 == 0:
        out.append(f"evals.teacher_nfe={ev['teacher_nfe']}: the Heun sampler makes 2N - 1 "
                   "evaluations, so it must be odd (e.g. 35) or 0")  # fmt: skip
    if ev["every_kimg"] <= 0:
        return out
    shape = tuple(cfg["dataset"].get("shape", ()))
    if len(shape) != 3:
        out.append(f"evals.every_kimg={ev['every_kimg']}: periodic FID needs images, but "
                   f"dataset.shape={shape}; set --config.evals.every_kimg=0")  # fmt: skip
    if not ev["ref"]:
        out.append(
            f"evals.every_kimg={ev['every_kimg']} needs reference statistics: set "
            "--config.evals.ref=FILE.npz (written by `scm-jax fid-stats --data ... --out "
            "FILE.npz`), or --config.evals.every_kimg=0 to turn periodic FID off"
        )
    elif check_paths and not Path(ev["ref"]).is_file():
        out.append(f"evals.ref: no FID statistics at {ev['ref']} (write them with `scm-jax "
                   "fid-stats --data ... --out FILE.npz`)")  # fmt: skip
    if check_paths and ev.get("inception") and not Path(ev["inception"]).exists():
        out.append(f"evals.inception: no FID Inception weights at {ev['inception']}; create them "
                   "once with `scm-jax fid-weights` ('' = the default location)")  # fmt: skip
    return out


def _consistency(cfg: Mapping[str, Any], check_paths: bool) -> list[str]:
    """Periodic consistency error: a consistency model with a teacher, times up to t_max."""
    keys = ("evals.consistency_every_kimg", "evals.consistency_teacher", "objective")
    if not _ok(cfg, *keys) or cfg["evals"]["consistency_every_kimg"] <= 0:
        return []
    ev, objective, out = cfg["evals"], _objective(cfg), []
    every = f"evals.consistency_every_kimg={ev['consistency_every_kimg']}"
    teacher, source = ev["consistency_teacher"], cfg["dataset"].get("source")
    if objective and not objective.consistency:
        out.append(f"{every}: a diffusion run is the teacher itself; measure it with `scm-jax "
                   "eval --workdir DIR --consistency`, or set it to 0")  # fmt: skip
    elif teacher == "exact_gmm" and source != "toy_gmm":
        out.append(f"evals.consistency_teacher='exact_gmm' needs dataset.source='toy_gmm', not "
                   f"{source!r}")  # fmt: skip
    elif teacher and teacher != "exact_gmm" and check_paths and not (
            Path(teacher) / RUN_CONFIG).is_file():  # fmt: skip
        out.append(f"evals.consistency_teacher {teacher!r} is not a training run's folder (no "
                   f"{RUN_CONFIG}); point it at a diffusion run's --workdir")  # fmt: skip
    elif not teacher and objective and not objective.needs_teacher and not cfg.get("init_from"):
        out.append(f"{every}: sCT has no teacher to compare with; set --config.evals."
                   "consistency_teacher=DIR (a diffusion run) or exact_gmm")  # fmt: skip
    if _ok(cfg, "evals.consistency_times", "trigflow.sigma_max", "trigflow.sigma_d"):
        t_max = math.atan(cfg["trigflow"]["sigma_max"] / cfg["trigflow"]["sigma_d"])
        if late := [t for t in ev["consistency_times"] if t > t_max + 1e-9]:
            out.append(f"evals.consistency_times {late} exceed t_max = {t_max:.5f}")
    return out


def _dmd(cfg: Mapping[str, Any], check_paths: bool) -> list[str]:
    """DMD / rCM (objectives with a critic): the regression batch, the teacher's
    guidance against the student, no gradient accumulation. Other objectives: nothing."""
    objective = _objective(cfg)
    if not (objective and objective.critic):
        return []
    out: list[str] = []
    if _ok(cfg, "dmd.regression_batch", "batch_size"):
        if cfg["dmd"]["regression_batch"] > cfg["batch_size"]:
            out.append(f"dmd.regression_batch={cfg['dmd']['regression_batch']} exceeds "
                       f"batch_size={cfg['batch_size']}; use at most the batch (0 = the whole "
                       "batch)")  # fmt: skip
    if _ok(cfg, "teacher.guidance_min", "teacher.guidance_max", "model.arch"):
        g_min, g_max = cfg["teacher"]["guidance_min"], cfg["teacher"]["guidance_max"]
        model = cfg["model"]
        if g_min != g_max and not model.get("guidance_input", False):
            out.append(f"teacher guidance range [{g_min}, {g_max}] needs model.guidance_input="
                       "True; a student without it distils one fixed scale (guidance_min = "
                       "guidance_max)")  # fmt: skip
        if (g_min, g_max) != (1.0, 1.0) and not model.get("num_classes", 0):
            out.append(f"teacher guidance [{g_min}, {g_max}]: classifier-free guidance needs a "
                       "class-conditional model (model.num_classes > 0) or guidance 1")  # fmt: skip
    if _ok(cfg, "train.micro_batches") and cfg["train"]["micro_batches"] != 1:
        out.append(f"train.micro_batches={cfg['train']['micro_batches']}: gradient accumulation "
                   f"is not implemented for objective {cfg['objective']}; set train."
                   "micro_batches=1 and a batch_size (or more devices) that fits")  # fmt: skip
    return out


# dataset.source -> what dataset.path must be for it
PATH_SOURCES = {
    "image_folder": "a folder or .tar(.gz) of <split>/<class>/*.png|jpg",
    "npz": "an .npz with x (N, ...) and optional labels",
    "latents": "a latent .npy (N, H, W, C) or .npz",
}


def _paths(cfg: Mapping[str, Any], check_paths: bool) -> list[str]:
    out: list[str] = []
    if _ok(cfg, "dataset.source", "dataset.path", "dataset.tfds_name"):
        ds = cfg["dataset"]
        what = PATH_SOURCES.get(ds["source"])
        if what and not ds["path"]:
            out.append(f"dataset.source={ds['source']!r} needs {what}: set "
                       "--config.dataset.path=...")  # fmt: skip
        elif what and check_paths and not Path(ds["path"]).exists():
            out.append(f"dataset.path {ds['path']!r} (source {ds['source']!r}) does not exist; "
                       f"set --config.dataset.path=... to {what}")  # fmt: skip
        if ds["source"] == "tfds" and not ds["tfds_name"]:
            out.append("dataset.source='tfds' needs --config.dataset.tfds_name=...")
        if ds["source"] == "latents" and _ok(cfg, "dataset.shape", "dataset.latent_mean",
                                             "dataset.latent_std"):  # fmt: skip
            c = ds["shape"][-1]
            if any(len(ds[k]) not in (0, c) for k in ("latent_mean", "latent_std")):
                out.append(f"dataset.latent_mean / latent_std need {c} values (one per channel "
                           "of dataset.shape) or none")  # fmt: skip
    init_from = cfg.get("init_from")
    if check_paths and isinstance(init_from, str) and init_from:
        if not (Path(init_from) / RUN_CONFIG).is_file():
            out.append(f"init_from {init_from!r} is not a training run's folder (no "
                       f"{RUN_CONFIG}); expected the --workdir of `scm-jax train`")  # fmt: skip
    return out


RELATIONS: list[Relation] = [
    _times, _batch, _data_and_network, _durations, _teacher, _snapshots, _evals, _consistency,
    _paths, _dmd,
]  # fmt: skip
