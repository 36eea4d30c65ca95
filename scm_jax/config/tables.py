"""The field tables of config validation (``scm_jax.config.validate``): each section's keys and the
check of each (type, range or choice), and the top-level fields. A key with a leading ``?`` is
optional (not every config has it)."""

from __future__ import annotations

import math

from scm_jax.config import defaults
from scm_jax.config.checks import (
    Check,
    boolean,
    integer,
    mesh_size,
    one_of,
    real,
    sequence,
    sharding_rules,
    text,
)
from scm_jax.data.scale import NORMALIZE_MODES
from scm_jax.losses.common import TANGENT_NORMS, WARMUP_FORMS
from scm_jax.networks import build as networks
from scm_jax.objectives import ROLLOUTS
from scm_jax.optim import OPTIMIZER_MOMENTS

EMA_STD_MAX = 12**-0.5  # EDM2's power-function EMA needs sigma_rel < 1/sqrt(12)
DTYPES = tuple(networks._DTYPES)  # model.dtype / param_dtype names build_network knows


# A key with a leading '?' is optional (not every config has it).
SECTIONS: dict[str, dict[str, Check]] = {
    "dataset": {
        "name": text(), "source": one_of(defaults.DATA_SOURCES), "path": text(),
        "tfds_name": text(), "tfds_data_dir": text(), "split": text(),
        "shape": sequence(integer(1), nonempty=True), "num_classes": integer(0),
        "flip": boolean(), "num_examples": integer(0), "latent_mean": sequence(real()),
        "latent_std": sequence(real(gt=0)), "mean": sequence(real()),
        "std": sequence(real(gt=0)), "normalize": one_of(NORMALIZE_MODES),
        "?means": sequence(sequence(real())),
        "?stds": sequence(real(gt=0)), "?weights": sequence(real(gt=0)),
    },
    "model": {  # keys of either architecture; which apply is checked by build_network
        "arch": one_of(networks.ARCHS), "?size": text(), "?num_classes": integer(0),
        "?dropout": real(ge=0, lt=1), "?label_dropout": real(ge=0, lt=1),
        "?guidance_input": boolean(), "?sigma_d": real(gt=0), "?c_noise_scale": real(gt=0),
        "?dtype": one_of(DTYPES), "?param_dtype": one_of(DTYPES),
        "?remat": one_of(networks.REMAT_POLICIES),
        "?weight_channels": integer(2), "?img_resolution": integer(1),
        "?img_channels": integer(1), "?model_channels": integer(1),
        "?channel_mult": sequence(integer(1), nonempty=True), "?num_blocks": integer(1),
        "?attn_resolutions": sequence(integer(1)), "?channels_per_head": integer(1),
        "?dropout_max_res": integer(0), "?data_dim": integer(1), "?hidden": integer(2),
        "?depth": integer(1), "?emb_channels": integer(2),
    },
    "trigflow": {"sigma_d": real(gt=0), "sigma_max": real(gt=0), "t_mid": real(gt=0),
                 "P_mean": real(), "P_std": real(gt=0)},
    "loss": {
        "tangent_c": real(gt=0), "tangent_norm": one_of(TANGENT_NORMS),
        "tangent_warmup_steps": integer(0), "tangent_warmup_kimg": real(ge=0),
        "tangent_warmup_fraction": real(ge=0, le=1), "warmup_form": one_of(WARMUP_FORMS),
        "adaptive_weighting": boolean(), "mask_nonfinite": boolean(),
    },
    "teacher": {"workdir": text(), "guidance_min": real(ge=0), "guidance_max": real(ge=0),
                "?kind": one_of(("", "exact_gmm")), "?ema_std": real(ge=0, lt=EMA_STD_MAX)},
    "optim": {
        "name": one_of(OPTIMIZER_MOMENTS), "lr": real(gt=0),
        "b1": real(ge=0, lt=1), "b2": real(ge=0, lt=1), "eps": real(gt=0),
        "lr_ref_kimg": real(ge=0), "lr_rampup_kimg": real(ge=0), "grad_clip": real(ge=0),
    },
    "ema": {"halflife_kimg": real(ge=0), "?halflife_fraction": real(ge=0, le=1),
            "power_std": sequence(real(gt=0, lt=EMA_STD_MAX)), "snapshot_every_kimg": real(ge=0)},
    "train": {
        "log_every_kimg": real(ge=0), "ckpt_every_kimg": real(ge=0),
        "keep_checkpoints": integer(1), "sample_every_kimg": real(ge=0),
        "sample_grid": integer(1), "teacher_sample_steps": integer(1),
        "prefetch_batches": integer(1), "micro_batches": integer(1),
        "max_consecutive_nonfinite": integer(0),
    },
    "evals": {
        "every_kimg": real(ge=0), "steps": sequence(integer(1)), "num": integer(2),
        "ref": text(), "inception": text(), "batch_size": integer(0), "teacher_nfe": integer(0),
        "seed": integer(0), "consistency_every_kimg": real(ge=0), "consistency_num": integer(1),
        "consistency_times": sequence(real(gt=0, lt=math.pi / 2)),
        "consistency_heun_steps": integer(1), "consistency_teacher": text(),
    },
    "dmd": {  # objectives dmd, rcm (defaults.DMD_DEFAULTS); cross-field rules in _dmd
        "weight": real(ge=0), "start_step": integer(0), "start_kimg": real(ge=0),
        "start_fraction": real(ge=0, le=1), "P_mean": real(), "P_std": real(gt=0),
        "critic_updates": integer(1), "critic_lr": real(ge=0),
        "critic_adaptive_weighting": boolean(), "critic_P_mean": real(),
        "critic_P_std": real(gt=0), "generator_steps": integer(1), "rollout": one_of(ROLLOUTS),
        "regression_weight": real(ge=0), "regression_steps": integer(1),
        "regression_batch": integer(0), "regression_pairs": integer(0),
    },
    "mesh": {
        "data": mesh_size(), "fsdp": mesh_size(), "tensor": mesh_size(),
        "dcn_data": integer(1), "dcn_fsdp": integer(1), "dcn_tensor": integer(1),
        "rules": sharding_rules(),
    },
}  # fmt: skip
# Top-level fields (not sections).
FIELDS: dict[str, Check] = {
    "objective": one_of(lambda: defaults.OBJECTIVES), "batch_size": integer(1),
    "total_kimg": real(gt=0), "seed": integer(0), "init_from": text(),
}  # fmt: skip


# Sections whose keys config.defaults defines: a key added there is known before it has a check.
_DEFAULTS = {"dataset": defaults.DATASET_DEFAULTS, "train": defaults.TRAIN_DEFAULTS,
             "ema": defaults.EMA_DEFAULTS,
             "evals": defaults.EVAL_DEFAULTS, "mesh": defaults.MESH_DEFAULTS,
             "dmd": defaults.DMD_DEFAULTS}  # fmt: skip
