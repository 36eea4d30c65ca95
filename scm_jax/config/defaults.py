"""Config plumbing: ``get_config(arg)`` argument parsing, config loading, and the shared layout.

A config file is ``configs/<dataset>.py`` with ``get_config(arg: str | None) -> ConfigDict``; the
argument is a comma-separated ``key=value`` list (big_vision style), e.g.
``configs/imagenet512.py:size=xxl,objective=scd``. A bare key means ``key=True``. Every config has
the same top-level sections (see :func:`assemble`), so code downstream never branches on the
dataset.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from scm_jax import objectives
from scm_jax.config.files import (  # noqa: F401  (re-exported: defaults.load_config)
    REPO_CONFIG_DIR,
    ConfigFileError,
    load_config,
    resolve_config_path,
)
from scm_jax.data.sources import DATA_SOURCES, DATASET_DEFAULTS  # noqa: F401  (re-exported)
from scm_jax.sharding import DEFAULT_RULES

# For config files, read from the objective table (scm_jax.objectives), which knows the rest:
# every objective, those that distil a teacher, those with a fake-score critic (train.step_dmd).
OBJECTIVES = objectives.names()
DISTILL_OBJECTIVES = objectives.names_where(lambda o: o.needs_teacher)
DMD_OBJECTIVES = objectives.names_where(lambda o: o.critic)
# The ``train`` section: intervals in thousands of images (0 = never, except at the end).
TRAIN_DEFAULTS: dict[str, Any] = {
    "log_every_kimg": 5.0,  # console line, metrics.jsonl and TensorBoard scalars
    "ckpt_every_kimg": 500.0,  # periodic checkpoint (always one at the end)
    "keep_checkpoints": 3,  # periodic checkpoints kept on disk
    "sample_every_kimg": 1000.0,  # 1- and 2-step sample grids (teachers: the ODE sampler)
    "sample_grid": 64,  # images per grid
    "teacher_sample_steps": 18,  # Heun steps of a teacher's grids (2 x steps - 1 NFE)
    "prefetch_batches": 2,  # host batches prepared ahead in a background thread
    "micro_batches": 1,  # gradient accumulation: the batch as k sequential micro-batches
    # Stop (with a checkpoint) after this many steps in a row had a non-finite loss or gradient
    # (each is skipped: nothing changes but the step counter); 0 = never stop.
    "max_consecutive_nonfinite": 20,
}
# The ``ema`` section: EMA profiles (``scm_jax.ema``) and EDM2 post-hoc EMA snapshots
# (``scm_jax.run.snapshots``, ``scm-jax phema``). A config's ``ema`` dict is merged over these.
EMA_DEFAULTS: dict[str, Any] = {
    "power_std": (),  # sigma_rel of each power-function EMA (EDM2: 0.05, 0.10)
    "halflife_kimg": 0.0,  # half-life EMA; 0 = none
    # Write every power EMA to <workdir>/ema_snapshots/ every this many kimg and at the end,
    # for `scm-jax phema` (any sigma_rel after training); 0 = off.
    "snapshot_every_kimg": 0.0,
    "halflife_fraction": 0.0,  # the half-life as a fraction of the run instead (one of the two)
}
# The ``evals`` section: periodic FID and consistency error during training (docs/evaluation.md);
# both off by default.
EVAL_DEFAULTS: dict[str, Any] = {
    "every_kimg": 0.0,  # FID of the EMA every this many kimg and at the end; 0 = off
    "steps": (1, 2),  # consistency step counts (diffusion runs: Heun at teacher_nfe)
    "num": 10_000,  # samples per setting (50k for paper numbers; < 2048 biases FID up)
    "ref": "",  # reference statistics (`scm-jax fid-stats`), required when on
    "inception": "",  # converted weights; '' = $SCM_JAX_INCEPTION, ~/.cache/scm_jax/...
    "batch_size": 0,  # samples per call over all devices; 0 = 256 (64 on CPU)
    "teacher_nfe": 0,  # diffusion runs: Heun NFE (0 = 2 train.teacher_sample_steps - 1)
    "seed": 0,  # sampling noise (the same at every evaluation); the consistency pairs' z, z'
    # Consistency error (scm_jax.eval.consistency) of the EMA every this many kimg and at the end;
    # 0 = off. Consistency models only (sct, scd, dmd, rcm).
    "consistency_every_kimg": 0.0,
    "consistency_num": 256,  # (x0, z) pairs: the first examples of the data
    "consistency_times": (),  # grid times t; () = 8 evenly spaced in log sigma; + t_mid, t_max
    "consistency_heun_steps": 64,  # Heun steps of the teacher's PF-ODE solves (2 x steps - 1 NFE)
    # '' = the run's teacher (scd, dmd, rcm) or its init_from diffusion run; or a diffusion run's
    # folder; 'exact_gmm' = the toy's exact mixture
    "consistency_teacher": "",
}
# The ``mesh`` section: device mesh and sharding rules (``scm_jax.sharding``, docs/scaling.md).
MESH_DEFAULTS: dict[str, Any] = {
    "data": -1,  # in-slice (ICI) axis sizes; -1 fills with the remaining devices
    "fsdp": 1,
    "tensor": 1,
    "dcn_data": 1,  # cross-slice (DCN: between hosts / TPU slices) sizes; the mesh axis is
    "dcn_fsdp": 1,  # ICI x DCN
    "dcn_tensor": 1,
    "rules": DEFAULT_RULES,  # (logical name, mesh axes) pairs; first applicable wins
}
# The ``dmd`` section: DMD / DMD2 and rCM's DMD term (objectives dmd, rcm; docs/method.md). Times
# are TrigFlow proposals t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2).
DMD_DEFAULTS: dict[str, Any] = {
    "weight": 1.0,  # lambda of the DMD term (rCM: 0.01)
    "start_step": 0,  # the DMD term is on from this step (rCM: after the tangent warm-up)
    "start_kimg": 0.0,  # ... or from this many kimg, or this fraction of the run (one of three)
    "start_fraction": 0.0,
    "P_mean": -0.6931,  # p_D: rCM's N(0, 1.6^2) in sigma / sigma_d, i.e. ln(0.5) at sigma_d = 0.5
    "P_std": 1.6,
    "critic_updates": 1,  # TTUR: fake-score updates per generator update (DMD2: 5; rCM: 4)
    "critic_lr": 0.0,  # the fake score's learning rate; 0 = optim.lr
    "critic_adaptive_weighting": True,  # the critic learns w_phi(t) like its teacher did
    "critic_P_mean": -1.0,  # the critic's diffusion-loss proposal
    "critic_P_std": 1.6,
    "generator_steps": 1,  # N: one-step (1) or the N-step rollout (rCM: N_max = 4)
    "rollout": "fixed",  # 'fixed': the sampler's times (DMD2); 'random': rCM's p_D times
    "regression_weight": 0.0,  # DMD's regression to teacher ODE pairs (DMD: 0.25); 0 = off
    "regression_steps": 18,  # Heun steps of the teacher's ODE for the pairs (NFE 2 x steps - 1)
    "regression_batch": 0,  # samples per step in the regression term; 0 = the whole batch
    "regression_pairs": 0,  # fixed pool of noises (DMD's paired set); 0 = fresh noise each step
}


def _coerce(key: str, raw: str, default: Any) -> Any:
    """Convert the string ``raw`` to the type of ``default``; raise a ValueError naming ``key``."""
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("1", "true", "yes", ""):
            return True
        if low in ("0", "false", "no"):
            return False
        raise ValueError(f"config argument {key}={raw!r} is not a boolean")
    try:
        return type(default)(raw)
    except (TypeError, ValueError):
        raise ValueError(
            f"config argument {key}={raw!r} is not a valid {type(default).__name__}"
        ) from None


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parse ``'a=1,b=x,flag'`` against typed defaults.

    Args:
      arg: the string after ``:`` in ``path.py:arg`` (None or empty: all defaults).
      **defaults: allowed keys and their default values; values are converted to the default's
        type (bool accepts true/false/1/0 and a bare key).
    Returns:
      A ConfigDict with every key of ``defaults``.
    Raises:
      ValueError: an unknown key (the message lists the known ones) or a value of the wrong type.
    """
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"unknown config argument {key!r}; known arguments: {', '.join(sorted(defaults))}"
            )
        out[key] = (
            _coerce(key, raw.strip(), defaults[key]) if sep else _coerce(key, "", defaults[key])
        )
    return ml_collections.ConfigDict(out)


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Raise ValueError unless ``value`` is one of ``choices`` (message names both)."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")


def unet_model(
    *,
    resolution: int,
    channels: int,
    num_classes: int,
    model_channels: int,
    channel_mult: tuple[int, ...],
    num_blocks: int,
    attn_resolutions: tuple[int, ...],
    channels_per_head: int = 64,
    dropout: float = 0.0,
    dropout_max_res: int = 16,
    label_dropout: float = 0.0,
    guidance_input: bool = False,
    size: str = "",
) -> dict[str, Any]:
    """The ``model`` section of an EDM2 U-Net config with sCM's conditioning defaults."""
    return {
        "arch": "edm2_unet",
        "size": size,
        "img_resolution": resolution,
        "img_channels": channels,
        "num_classes": num_classes,
        "model_channels": model_channels,
        "channel_mult": tuple(channel_mult),
        "num_blocks": num_blocks,
        "attn_resolutions": tuple(attn_resolutions),
        "channels_per_head": channels_per_head,
        "dropout": dropout,
        "dropout_max_res": dropout_max_res,
        "label_dropout": label_dropout,
        "guidance_input": guidance_input,
        "time_embedding": "positional",  # sCM §4.1; 'fourier' = stock EDM2
        "c_noise_mode": "t",  # sCM: c_noise(t) = t; 'edm' = ln(sigma)/4
        "c_noise_scale": 1.0,
        "modulation": "adn",  # sCM adaptive double normalisation; 'mul' = stock EDM2
        "weight_channels": 128,
        "dtype": "float32",
        "param_dtype": "float32",
        "remat": "none",  # activation rematerialisation: 'none', 'block' or 'full'
    }


def edm2_model(size: str, *, channels: int, smoke: bool, **kwargs: Any) -> dict[str, Any]:
    """The ``model`` section of an EDM2 size at 64x64 (config G), or its 16x16 smoke version.

    Args:
      size: one of ``EDM2_CHANNELS`` (xs..xxl).
      channels: image channels (3 pixels, 4 latents).
      smoke: a 16x16, 16-channel, one-block network for CPU smoke runs.
      **kwargs: the remaining :func:`unet_model` arguments (num_classes, dropout, ...).
    """
    from scm_jax.networks.presets import EDM2_CHANNELS

    check_choice("size", size, tuple(EDM2_CHANNELS))
    if smoke:
        arch = {"resolution": 16, "model_channels": 16, "channel_mult": (1, 2), "num_blocks": 1,
                "attn_resolutions": (8,), "channels_per_head": 16, "size": "smoke"}  # fmt: skip
    else:
        arch = {"resolution": 64, "model_channels": EDM2_CHANNELS[size],
                "channel_mult": (1, 2, 3, 4), "num_blocks": 3, "attn_resolutions": (16, 8),
                "channels_per_head": 64, "size": size}  # fmt: skip
    return unet_model(channels=channels, **arch, **kwargs)


def assemble(
    *,
    dataset: dict[str, Any],
    objective: str,
    model: dict[str, Any],
    sigma_d: float,
    P_mean: float,
    P_std: float,
    optim: dict[str, Any],
    ema: dict[str, Any],
    batch_size: int,
    total_kimg: float,
    teacher: dict[str, Any] | None = None,
    sigma_max: float = 80.0,
    t_mid: float = 1.1,
    tangent_c: float = 0.1,
    tangent_warmup_steps: int = 10_000,
    tangent_warmup_kimg: float = 0.0,
    tangent_warmup_fraction: float = 0.0,
    train: dict[str, Any] | None = None,
    evals: dict[str, Any] | None = None,
    mesh: dict[str, Any] | None = None,
    dmd: dict[str, Any] | None = None,
    init_from: str = "",
) -> ml_collections.ConfigDict:
    """Build a locked config with the layout every dataset shares.

    Sections: ``dataset`` (source and shape; :data:`DATASET_DEFAULTS` fills the keys a config
    leaves out), ``objective``, ``model`` (network; ``build_network`` input), ``trigflow``
    (sigma_d, sigma_max, t_mid, proposal P_mean/P_std), ``loss`` (consistency stabilisers),
    ``teacher`` (sCD), ``optim``, ``ema`` (:data:`EMA_DEFAULTS`), ``batch_size``,
    ``total_kimg``, ``seed``, ``init_from``, ``train`` (intervals, checkpoints;
    :data:`TRAIN_DEFAULTS`), ``mesh`` (devices and sharding rules; :data:`MESH_DEFAULTS`),
    ``evals`` (periodic FID; :data:`EVAL_DEFAULTS`) and ``dmd`` (DMD / rCM;
    :data:`DMD_DEFAULTS`).
    ``model.sigma_d`` and ``trigflow.sigma_d`` are one shared field: overriding either changes both.
    """
    check_choice("objective", objective, OBJECTIVES)
    sd = ml_collections.FieldReference(sigma_d)
    unknown = sorted(set(train or {}) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown train option(s) {unknown}; known: {sorted(TRAIN_DEFAULTS)}")
    unknown = sorted(set(ema) - set(EMA_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown ema option(s) {unknown}; known: {sorted(EMA_DEFAULTS)}")
    unknown = sorted(set(evals or {}) - set(EVAL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown evals option(s) {unknown}; known: {sorted(EVAL_DEFAULTS)}")
    unknown = sorted(set(mesh or {}) - set(MESH_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown mesh option(s) {unknown}; known: {sorted(MESH_DEFAULTS)}")
    unknown = sorted(set(dmd or {}) - set(DMD_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown dmd option(s) {unknown}; known: {sorted(DMD_DEFAULTS)}")
    cfg = ml_collections.ConfigDict()
    cfg.dataset = {**DATASET_DEFAULTS, **dataset}
    cfg.objective = objective
    cfg.model = dict(model)
    cfg.model.sigma_d = sd
    cfg.trigflow = ml_collections.ConfigDict(
        {"sigma_max": sigma_max, "t_mid": t_mid, "P_mean": P_mean, "P_std": P_std}
    )
    cfg.trigflow.sigma_d = sd
    entry = objectives.get(objective)
    cfg.loss = {
        "tangent_c": tangent_c,  # tangent normalisation g / (||g|| + c)
        "tangent_norm": "l2",  # 'l2' over all elements (paper) or 'rms'; docs/method.md
        # H in r = min(1, step / H), in steps, kimg or a fraction of the run (set one; 0 = off)
        "tangent_warmup_steps": tangent_warmup_steps,
        "tangent_warmup_kimg": tangent_warmup_kimg,
        "tangent_warmup_fraction": tangent_warmup_fraction,
        "warmup_form": entry.warmup_form,  # 'scm' (Alg. 1) or 'rcm'
        "adaptive_weighting": entry.adaptive_weighting,  # False: fixed prior weight (rCM: none)
        "mask_nonfinite": True,  # drop samples whose target is not finite (counted)
    }
    cfg.teacher = teacher or {"workdir": "", "guidance_min": 1.0, "guidance_max": 1.0}
    cfg.optim = optim
    cfg.ema = {**EMA_DEFAULTS, **ema}
    cfg.batch_size = batch_size
    cfg.total_kimg = total_kimg
    cfg.seed = 0  # parameters, noise, times and data order all derive from it
    cfg.init_from = init_from  # a workdir or export folder whose EMA weights start this run
    cfg.train = {**TRAIN_DEFAULTS, **(train or {})}
    cfg.evals = {**EVAL_DEFAULTS, **(evals or {})}
    cfg.mesh = {**MESH_DEFAULTS, **(mesh or {})}
    cfg.dmd = {**DMD_DEFAULTS, **(dmd or {})}
    cfg.lock()
    return cfg


def kimg(iterations: float, batch_size: int) -> float:
    """Training duration in thousands of images for ``iterations`` steps at ``batch_size``."""
    return math.ceil(iterations * batch_size) / 1000


def dmd_options(
    objective: str,
    *,
    lr: float,
    P_mean: float,
    P_std: float,
    tangent_warmup_steps: int = 0,
    tangent_warmup_kimg: float = 0.0,
    tangent_warmup_fraction: float = 0.0,
) -> dict[str, Any]:
    """The ``dmd`` section of a dmd or rcm config (reference §7, §8; docs/method.md).

    dmd: DMD2's one-step generator with 5 critic updates per generator update, the critic at the
    student's learning rate (DMD2, sCM's adaptive VSD). rcm: rCM's lambda = 0.01 from the end of
    the tangent warm-up, rollouts of up to 4 steps at random p_D times, 4 critic updates per
    student update (F = 5) at 0.2 x the student's rate. Both: the critic's proposal is the
    config's consistency proposal (``P_mean``, ``P_std``; sCM's adaptive VSD). Other objectives:
    {} (the defaults, unused).
    """
    entry = objectives.get(objective)
    if not entry.critic:
        return {}
    common = {"critic_P_mean": P_mean, "critic_P_std": P_std}
    if not entry.scm_term:  # DMD alone: DMD2's recipe; with sCM's term: rCM's
        return {**common, "critic_updates": 5, "critic_lr": lr, "generator_steps": 1,
                "rollout": "fixed"}  # fmt: skip
    start = {"start_step": tangent_warmup_steps, "start_kimg": tangent_warmup_kimg,
             "start_fraction": tangent_warmup_fraction}  # fmt: skip
    return {**common, **start, "weight": 0.01, "critic_updates": 4, "critic_lr": 0.2 * lr,
            "generator_steps": 4, "rollout": "random"}  # fmt: skip
