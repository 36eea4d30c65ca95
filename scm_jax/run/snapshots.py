"""Post-hoc EMA snapshots: the power-function EMAs written during training for ``scm-jax phema``.

With ``ema.snapshot_every_kimg`` > 0 the training loop writes every power EMA (each
``ema.power_std`` profile) every that many kimg and once at the end (also when stopped by a
signal or by non-finite steps)::

    <workdir>/ema_snapshots/<step, 10 digits>.safetensors

One safetensors file (no pickle) per snapshot: tensors ``<ema name>/<PyTorch name>`` (e.g.
``power_0.050/enc_8x8_block0.conv_res0.weight``) in the layouts of an export
(``scm_jax.run.state_dict``; bfloat16 stored as float32), and in the header's metadata
``scm_jax_snapshot``: JSON ``{"format_version", "step", "nimg", "batch_size", "emas":
{name: sigma_rel}, "time"}``. EMA weights only, no optimiser state: a snapshot costs
4 bytes x parameters x profiles (two profiles: imagenet64 size S, 294 M parameters, 2.35 GB;
mnist, 0.78 M, 6.2 MB), and a run keeps total_kimg / snapshot_every_kimg of them.

Writes are atomic (``.<name>.tmp`` then a rename over any file of that step) and made by the main
process only, in a background thread (one at a time) after the EMAs have been copied to the host
(sharded arrays gathered first): training waits for the device only at snapshot steps. A resumed
run first deletes the snapshots after its checkpoint's step (written by the interrupted run
past its last checkpoint; the resumed run writes those steps again), so a workdir never holds
two trajectories, nor a step twice.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from scm_jax.ema import ema_names

SNAPSHOT_DIR = "ema_snapshots"
SNAPSHOT_KEY = "scm_jax_snapshot"  # the safetensors metadata entry holding the JSON
FORMAT_VERSION = 1


def snapshot_dir(workdir: str | Path) -> Path:
    """``<workdir>/ema_snapshots``."""
    return Path(workdir) / SNAPSHOT_DIR


def snapshot_path(workdir: str | Path, step: int) -> Path:
    """``<workdir>/ema_snapshots/<step:010d>.safetensors``."""
    return snapshot_dir(workdir) / f"{int(step):010d}.safetensors"


def _step_of(path: Path) -> int | None:
    stem, suffix = path.name.split(".", 1) if "." in path.name else (path.name, "")
    return int(stem) if suffix == "safetensors" and stem.isdigit() else None


def snapshot_steps(workdir: str | Path) -> list[int]:
    """Steps of the snapshot files in ``workdir`` (complete ones: temporary files are not
    listed), ascending."""
    folder = snapshot_dir(workdir)
    if not folder.is_dir():
        return []
    return sorted(s for p in folder.iterdir() if (s := _step_of(p)) is not None)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One snapshot file's header: where it is, when it was taken and which EMAs it holds."""

    path: Path
    step: int
    nimg: int
    batch_size: int
    emas: dict[str, float]  # EMA name -> sigma_rel


def read_snapshot(path: str | Path) -> Snapshot:
    """A snapshot file's header (no tensor is read).

    Raises:
      ValueError: not a readable safetensors file, or not an scm-jax EMA snapshot.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            meta = (f.metadata() or {}).get(SNAPSHOT_KEY)
    except Exception as e:  # SafetensorError / OSError for damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"EMA snapshot {str(path)!r} is damaged ({first[:200]}); move it out of "
            f"{path.parent} to reconstruct from the others"
        ) from None
    try:
        info = json.loads(meta)
        if info["format_version"] > FORMAT_VERSION:
            raise ValueError(f"format_version {info['format_version']}; upgrade scm-jax")
        return Snapshot(path, int(info["step"]), int(info["nimg"]), int(info["batch_size"]),
                        {str(k): float(v) for k, v in info["emas"].items()})  # fmt: skip
    except (TypeError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{str(path)!r} is not an scm-jax EMA snapshot ({SNAPSHOT_KEY} metadata: {e})"
        ) from None


def host_copy(tree: Any) -> Any:
    """``tree`` as numpy arrays on this host; arrays sharded over several processes are gathered
    first (every process must call this, at the same step)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, jax.device_get(tree))


def write_snapshot(
    workdir: str | Path, step: int, batch_size: int, emas: Mapping[str, Any],
    sigma_rel: Mapping[str, float],
) -> Path:  # fmt: skip
    """Write one snapshot file atomically (see the module docstring); returns its path.

    Args:
      step, batch_size: the optimiser step the EMAs are at and the global batch.
      emas: ``{name: network params tree}`` (numpy or jax arrays).
      sigma_rel: ``{name: sigma_rel}`` of the same names.
    """
    from scm_jax.run.state_dict import save_safetensors, to_state_dict

    path = snapshot_path(workdir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}/{k}": v for name, tree in emas.items()
               for k, v in to_state_dict(tree).items()}  # fmt: skip
    info = {"format_version": FORMAT_VERSION, "step": int(step), "nimg": int(step) * batch_size,
            "batch_size": int(batch_size), "emas": {n: float(sigma_rel[n]) for n in emas},
            "time": time.time()}  # fmt: skip
    save_safetensors(path, tensors, {SNAPSHOT_KEY: json.dumps(info)})  # .<name>.tmp, rename
    return path


class SnapshotWriter:
    """Writes a run's snapshots (used by the training loop).

    Args:
      workdir: the run's folder.
      power_std: ``config.ema.power_std`` (the EMAs written: ``power_<sigma_rel>``).
      batch_size: the global batch.
      is_main_process: only the main process touches files (all gather the arrays).
      log: progress lines.

    ``last_step`` is the step of this run's latest snapshot (None before its first): the loop
    writes one at the end unless it is the last step's (a resumed run that takes no step
    rewrites its starting step's file with the same weights).
    """

    def __init__(
        self, workdir: str | Path, power_std: Sequence[float], batch_size: int, *,
        is_main_process: bool = True, log: Callable[[str], None] = print,
    ) -> None:  # fmt: skip
        self.workdir = Path(workdir)
        self.sigma_rel = {name: float(s) for name, s in
                          zip(ema_names(power_std, 0.0), power_std, strict=True)}  # fmt: skip
        self.batch_size = int(batch_size)
        self.is_main = is_main_process
        self.log = log
        self.last_step: int | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, step: int) -> None:
        """Before training from ``step``: delete snapshots after it and stale temporary files
        (main process only; what every process does next depends on no file, so all of them
        take part in the same gathers)."""
        if self.is_main and snapshot_dir(self.workdir).is_dir():
            for tmp in snapshot_dir(self.workdir).glob(".*.tmp"):
                tmp.unlink()
            later = [s for s in snapshot_steps(self.workdir) if s > step]
            for s in later:
                snapshot_path(self.workdir, s).unlink()
            if later:
                self.log(f"  deleted {len(later)} EMA snapshot(s) after step {step} (steps "
                         f"{later[0]}..{later[-1]}, past the checkpoint resumed from); this "
                         "run writes them again")  # fmt: skip

    def write(self, step: int, emas: Mapping[str, Any]) -> None:
        """Snapshot the power EMAs of ``emas`` (the train state's ``{name: tree}``) at ``step``:
        copied to the host now (a device sync), written in the background."""
        host = host_copy({name: emas[name] for name in self.sigma_rel})
        self.wait()
        self.last_step = step
        if not self.is_main:
            return

        def run() -> None:
            try:
                write_snapshot(self.workdir, step, self.batch_size, host, self.sigma_rel)
            except BaseException as e:  # re-raised by wait() in the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name="scm_jax_ema_snapshot", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the pending write is on disk.

        Raises:
          OSError: the write failed (disk full, permissions; the message names the file).
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(f"could not write the EMA snapshot in {snapshot_dir(self.workdir)}: "
                          f"{error}") from error  # fmt: skip
