"""Durations in the run's own units: a tangent warm-up, a DMD start or an EMA half-life given in
steps, thousands of images or a fraction of the run, resolved to the units the training step
reads (docs/training.md, "Durations in the run's units")."""

from __future__ import annotations

import math
from typing import Any

import ml_collections

# (section, steps field, kimg field, fraction field): one duration given in one of three units.
STEP_DURATIONS = (
    ("loss", "tangent_warmup_steps", "tangent_warmup_kimg", "tangent_warmup_fraction"),
    ("dmd", "start_step", "start_kimg", "start_fraction"),
)


def total_steps(config: Any) -> int:
    """Optimiser steps of the run: ceil(total_kimg * 1000 / batch_size)."""
    return math.ceil(float(config["total_kimg"]) * 1000 / int(config["batch_size"]))


def duration_steps(config: Any, section: str, steps: str, kimg: str, fraction: str) -> int:
    """One duration of ``config[section]`` in steps, from whichever of its three fields is set:
    ``steps`` as is, ``kimg`` as round(kimg * 1000 / batch), ``fraction`` as round(fraction *
    total steps). 0 when none is set (validation refuses more than one)."""
    sec = config[section]
    if float(sec.get(fraction, 0.0) or 0.0) > 0:
        return round(float(sec[fraction]) * total_steps(config))
    if float(sec.get(kimg, 0.0) or 0.0) > 0:
        return max(1, round(float(sec[kimg]) * 1000 / int(config["batch_size"])))
    return int(sec.get(steps, 0) or 0)


def resolve_durations(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose durations are in the units the training step reads: the tangent
    warm-up and the DMD start in steps (``loss.tangent_warmup_steps``, ``dmd.start_step``), the
    EMA half-life in kimg (``ema.halflife_kimg``); their kimg / fraction fields set to 0.
    Idempotent; call it after validation."""
    plain = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out = ml_collections.ConfigDict(plain)
    for section, steps, kimg, fraction in STEP_DURATIONS:
        if section not in out:
            continue
        value = duration_steps(out, section, steps, kimg, fraction)
        out[section][steps] = value
        for key in (kimg, fraction):
            if key in out[section]:
                out[section][key] = 0.0
    frac = float(out.ema.get("halflife_fraction", 0.0) or 0.0) if "ema" in out else 0.0
    if frac > 0:
        out.ema.halflife_kimg = frac * float(out.total_kimg)
        out.ema.halflife_fraction = 0.0
    if getattr(config, "is_locked", False):
        out.lock()
    return out
