"""The export folder: ``model.safetensors`` + ``config.json``, written and read.

::

    OUT/model.safetensors   EMA network parameters, PyTorch names and layouts (state_dict.py)
    OUT/config.json         {"format": "scm-jax-export", "model": {...}, "trigflow": {...},
                             "objective", "sigma_d", "sigma_max", "t_max", "t_mid", "guidance",
                             "ema", "step", "source", "dataset": {...},
                             "data_scale": {"mean": [C], "std": [C], "sigma_d"}, ...}

``data_scale`` is the map from model units to data units that every sampler applies to its
output (``scm_jax.data.scale``; empty lists: none).

The config's ``model``/``trigflow``/``objective`` keys are those of a run's ``config.json``, so
code that reads a run's config (``load_run_config``, the teacher and ``init_from`` checks) reads an
export's too. ``scm_jax.load_sampler``, ``scm_jax.torch.load_network`` and a sCD teacher or
``init_from`` accept an export folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from scm_jax.files import WriteError, write_json_atomic
from scm_jax.run.state_dict import load_safetensors, save_safetensors, to_state_dict

EXPORT_FORMAT = "scm-jax-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"  # = scm_jax.run.layout.CONFIG_FILE


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an export folder (its config.json says so) rather than a run."""
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == EXPORT_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def default_guidance(run_cfg: Mapping[str, Any]) -> float | None:
    """The guidance input a sampler uses by default: the middle of the training range (None for
    models without a guidance input)."""
    if not run_cfg["model"].get("guidance_input"):
        return None
    teacher = run_cfg.get("teacher", {}) or {}
    return 0.5 * (teacher.get("guidance_min", 1.0) + teacher.get("guidance_max", 1.0))


def export_config(
    run_cfg: Mapping[str, Any], *, ema: str | None, step: int | None, source: str
) -> dict[str, Any]:
    """The export's config.json from a run's config (plain dict) and where the weights came from."""
    from scm_jax.data.scale import data_scale

    tf = dict(run_cfg["trigflow"])
    sigma_d, sigma_max = float(tf["sigma_d"]), float(tf["sigma_max"])
    dataset = dict(run_cfg.get("dataset") or {})
    return {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": WEIGHTS_FILE,
        "layout": "PyTorch: conv OIHW, linear (out, in); images NCHW in scm_jax.torch",
        "model": dict(run_cfg["model"]),
        "trigflow": tf,
        "objective": run_cfg["objective"],
        "sigma_d": sigma_d,
        "sigma_max": sigma_max,
        "t_max": math.atan(sigma_max / sigma_d),
        "t_mid": float(tf["t_mid"]),
        "guidance": default_guidance(run_cfg),
        "teacher": {
            k: v
            for k, v in (run_cfg.get("teacher") or {}).items()
            if k in ("guidance_min", "guidance_max")
        },
        "ema": ema,
        "step": step,
        "source": source,
        "dataset": dataset,
        # samples in data units: x_data = x_model * std[c] / sigma_d + mean[c] (empty: as is)
        "data_scale": data_scale(dataset, sigma_d).to_dict(),
    }


def save_export(out: str | Path, params: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """Write ``OUT/model.safetensors`` (``params``: the Flax network tree) and ``OUT/config.json``.

    Raises:
      ValueError: ``out`` exists and is not a folder, or cannot be written (the message says so).
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors(out / WEIGHTS_FILE, to_state_dict(params))
        write_json_atomic(out / CONFIG_FILE, dict(config), indent=2, sort_keys=True)
    except WriteError:  # one line already: 'could not write P: ...; P was left unchanged'
        raise
    except OSError as e:
        raise ValueError(f"cannot write the export to {str(out)!r}: {e.strerror or e}") from None
    return out


def read_export_config(path: str | Path) -> dict[str, Any]:
    """An export folder's config.json.

    Raises:
      FileNotFoundError: no config.json; ValueError: unreadable, or not an scm-jax export.
    """
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no {CONFIG_FILE}: an export folder holds {WEIGHTS_FILE} and "
            f"{CONFIG_FILE} (written by `scm-jax export`)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{str(cfg_path)!r} is not valid JSON ({e.msg}, line {e.lineno})"
        ) from None
    if not isinstance(cfg, dict) or cfg.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f'{str(cfg_path)!r} is not an scm-jax export config (no "format": "{EXPORT_FORMAT}")'
        )
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{str(cfg_path)!r} has format_version {cfg['format_version']}; this "
            f"scm-jax reads up to {FORMAT_VERSION}: upgrade scm-jax"
        )
    return cfg


def load_export(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """An export's parameters (nested numpy tree in JAX layouts) and config.

    Raises:
      FileNotFoundError / ValueError: missing or unreadable files, or weights that do not fit the
        config's network (the message names the tensors).
    """
    from scm_jax.networks import build_network
    from scm_jax.run.state_dict import from_state_dict

    cfg = read_export_config(path)
    state = load_safetensors(Path(path) / cfg.get("weights", WEIGHTS_FILE))
    abstract = build_network(cfg["model"]).abstract_params()["net"]
    return from_state_dict(state, abstract, where=str(Path(path) / WEIGHTS_FILE)), cfg


def tree_equal(a: Any, b: Any) -> bool:
    """Whether two nested dicts of arrays are bit-identical (same names, dtypes and bytes)."""
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        return False
    if isinstance(a, Mapping):
        return set(a) == set(b) and all(tree_equal(a[k], b[k]) for k in a)
    x, y = np.asarray(a), np.asarray(b)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
