"""A run's folder: its saved config, and the rules for resuming in it.

``<workdir>/config.json`` is the resolved config of the run (written when the run starts). A run
started in a workdir that already holds checkpoints resumes from them, but only with the same
*identity*: the fields that decide the shape of the saved state or the data order (objective,
network, dataset shape, batch, seed, EMA profiles, optimiser). Anything else (learning rate,
duration, intervals) may change on resume; the changes are reported and the previous config is
kept as ``config.<step>.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"
# Dotted prefixes of the fields that must match to resume.
IDENTITY_FIELDS = ("objective", "model.", "dataset.shape", "dataset.num_classes", "batch_size",
                   "seed", "ema.", "optim.name", "dataset.normalize", "dataset.mean",
                   "dataset.std")  # fmt: skip
# Identity fields added after runs were made: a checkpoint without them was made with this value
# (the data's scale: scm_jax.data.scale; before it existed, no normalisation).
ADDED_FIELDS = {"dataset.normalize": "none", "dataset.mean": [], "dataset.std": []}
# Model fields that do not change the parameter tree (a teacher or init_from source may differ).
NON_ARCH_FIELDS = ("dropout", "dropout_max_res", "label_dropout", "guidance_input", "size",
                   "dtype", "param_dtype", "remat")  # fmt: skip
# Identity fields that a resume may still change (or an older config.json may lack): memory levers
# that leave the parameters and the result unchanged, and the post-hoc EMA snapshot interval.
RESUMABLE_FIELDS = ("model.remat", "ema.snapshot_every_kimg")


def config_to_dict(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-compatible plain dict of a config (tuples become lists)."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=list))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}} -> {'a.b': 1}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted field: (old, new)}`` for every field that differs (missing = None)."""
    a, b = flatten(config_to_dict(old)), flatten(config_to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _is_identity(field: str) -> bool:
    if field in RESUMABLE_FIELDS:
        return False
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in IDENTITY_FIELDS)


def run_identity(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
    """The identity fields of a config, flattened (``{'objective': 'sct', 'model.arch': ...}``):
    what a checkpoint records in its ``meta`` and a resumed run must match."""
    flat = flatten(config_to_dict(config))
    return {k: v for k, v in flat.items() if _is_identity(k)}


def identity_diff(
    saved: Mapping[str, Any], config: Mapping[str, Any] | ml_collections.ConfigDict
) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, this config's value)}`` for identity fields that differ; fields
    only one side has count as differing unless they are :data:`RESUMABLE_FIELDS`."""
    now = run_identity(config)
    saved = {**{k: v for k, v in ADDED_FIELDS.items() if k in now}, **saved}
    keys = sorted((set(saved) | set(now)) - set(RESUMABLE_FIELDS))
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and a rename (never a half-written file)."""
    from scm_jax.files import write_json_atomic as write  # the one implementation

    write(path, obj, indent=2, sort_keys=True)


def load_run_config(workdir: str | Path) -> dict[str, Any]:
    """The config a training run saved in ``workdir`` (a plain dict).

    Raises:
      FileNotFoundError: ``workdir`` is not a training run's folder.
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(workdir)!r} is not a training run's folder (no {CONFIG_FILE}); expected the "
            "--workdir of `scm-jax train`"
        )
    return json.loads(path.read_text())


def prepare_workdir(
    workdir: str | Path, config: ml_collections.ConfigDict, *, has_checkpoint: bool,
    step: int = 0, is_main_process: bool = True, check_only: bool = False,
) -> list[str]:  # fmt: skip
    """Check that ``config`` may run in ``workdir`` and save it there.

    Args:
      workdir: the run's folder (created if missing).
      config: the resolved config of this run.
      has_checkpoint: whether the workdir holds a checkpoint (a resume).
      step: the checkpoint's step (names the backup of a changed config).
      is_main_process: only the main process writes files.
      check_only: only check (and return the changes); write nothing.
    Returns:
      Human-readable lines describing fields changed since the saved config (empty if none).
    Raises:
      ValueError: the workdir holds a checkpoint of a run with a different identity (the message
        lists the fields); nothing is written then.
    """
    workdir = Path(workdir)
    path = workdir / CONFIG_FILE
    new = config_to_dict(config)
    changes: list[str] = []
    if has_checkpoint and path.is_file():
        diff = config_diff(json.loads(path.read_text()), new)
        clash = {k: v for k, v in diff.items() if _is_identity(k)}
        if clash:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(clash.items())[:8])
            raise ValueError(
                f"{workdir} holds checkpoints of a run with another config ({lines}). "
                "Use a new --workdir, or the config of that run (its config.json); to start a "
                f"new run from its weights, pass --config.init_from={workdir}"
            )
        changes = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()]
        if check_only:
            return changes
        if changes and is_main_process:
            os.replace(path, workdir / f"config.{step}.json")
    if is_main_process and not check_only:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, new)
    return changes


def check_same_architecture(
    expected: Mapping[str, Any], found: Mapping[str, Any], *, what: str, where: str
) -> None:
    """Raise ValueError unless two ``model`` sections build the same parameter tree.

    Fields in :data:`NON_ARCH_FIELDS` (dropout, guidance input, dtypes) may differ.
    """
    a = {k: v for k, v in config_to_dict(expected).items() if k not in NON_ARCH_FIELDS}
    b = {k: v for k, v in config_to_dict(found).items() if k not in NON_ARCH_FIELDS}
    diff = {k: (b.get(k), a.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    if diff:
        items = [f"model.{k}: {x!r} there, {y!r} here" for k, (x, y) in diff.items()]
        more = f"; and {len(items) - 8} more" if len(items) > 8 else ""
        raise ValueError(
            f"the {what} in {where} has another architecture ({'; '.join(items[:8])}{more})"
        )
