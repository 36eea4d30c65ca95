"""Metric writers without TensorFlow: JSON lines, TensorBoard (tensorboardX), fan-out, no-op.

``clu.metric_writers`` imports TensorFlow, so the training loop uses these instead. Layout of a
work directory written by :func:`create_writers`::

    workdir/metrics.jsonl          one JSON object per write_scalars call (appended across
                                   resumes; each step once, see :func:`drop_rows_after`)
    workdir/metrics.dropped.jsonl  rows of interrupted runs that a resume redid (a copy)
    workdir/tensorboard/           tensorboardX event files (scalars, images, text)

JSON lines: every line is ``{"step": int, "time": unix seconds, name: value, ...}``. Non-finite
floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (strict JSON has no
NaN/Infinity, and null would lose which one it was); :func:`read_metrics` turns them back into
floats. Images and text go to TensorBoard only.
"""

from __future__ import annotations

import abc
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
DROPPED_FILE = "metrics.dropped.jsonl"
TENSORBOARD_DIR = "tensorboard"

_NONFINITE_TOKENS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class Writer(abc.ABC):
    """Where the training loop sends scalars, images and text. Usable as a context manager."""

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record scalar values (Python/numpy/jax scalars) at ``step``."""

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Record uint8 ``(H, W, C)`` (C in 1, 3, 4) or ``(H, W)`` images at ``step``."""
        del step, images

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """Record text (Markdown in TensorBoard) at ``step``."""
        del step, texts

    def flush(self) -> None:  # noqa: B027 (optional hook: nothing to flush by default)
        """Push buffered records to storage."""

    def close(self) -> None:  # noqa: B027 (optional hook: nothing to release by default)
        """Flush and release resources; the writer must not be used afterwards."""

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_value(name: str, value: Any) -> int | float | bool | str:
    a = np.asarray(value)
    if a.size != 1:
        raise ValueError(f"scalar {name!r} must have one element, got shape {a.shape}")
    a = a.reshape(())
    if a.dtype.kind == "b":
        return bool(a)
    if a.dtype.kind in "iu":
        return int(a)
    v = float(a)
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


class JsonlWriter(Writer):
    """Appends one JSON object per :meth:`write_scalars` call to ``path``, flushed at once.

    The file is opened in append mode, so a resumed run continues it (the training loop first
    drops the rows after the restored checkpoint: :func:`drop_rows_after`). A line torn by a
    crash is terminated on reopening so that the following lines stay valid. Flushing after every
    line survives a process crash (not a power cut: there is no fsync).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        if torn:
            self._file.write("\n")
            self._file.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Append ``{"step", "time", **scalars}`` as one line; names must not be step/time."""
        clash = {"step", "time"} & set(scalars)
        if clash:
            raise ValueError(f"scalar names {sorted(clash)} are reserved")
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        record.update({k: _json_value(k, v) for k, v in scalars.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def flush(self) -> None:
        """Flush the file (already done after every line)."""
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        """Close the file; idempotent."""
        if not self._file.closed:
            self._file.close()


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE_TOKENS:
        return _NONFINITE_TOKENS[value]
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` (file, or a work directory containing one) back.

    Returns one dict per line in file order, with ``"nan"``/``"inf"``/``"-inf"`` turned back
    into floats. Blank lines are skipped; undecodable ones (a line torn by a crash) are skipped
    with a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records: list[dict[str, Any]] = []
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            records.append({k: _decode(v) for k, v in obj.items()})
    if bad:
        warnings.warn(f"{path}: skipped {bad} undecodable line(s)", stacklevel=2)
    return records


def drop_rows_after(path: str | os.PathLike, step: int) -> int:
    """Remove the rows with ``"step" > step`` from a ``metrics.jsonl`` before a run resumed at
    ``step`` appends to it, so that the file holds each step once, in order.

    The rows are those an interrupted run wrote after its last checkpoint; the resumed run
    redoes those steps. They are appended (as they were) to ``metrics.dropped.jsonl`` beside it,
    for a post-mortem of the interrupted run; nothing reads that file. ``metrics.jsonl`` is
    rewritten atomically (``scm_jax.files``): a crash leaves the old or the
    new file, never a mix. Undecodable lines (torn by a crash) are dropped too; blank ones
    vanish. Returns the number of rows dropped (0: the file is left untouched; also when it
    does not exist).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row_step = json.loads(line)["step"]
                ok = int(row_step) <= step
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                ok = False
            (keep if ok else dropped).append(line if line.endswith("\n") else line + "\n")
    if not dropped:
        return 0
    with open(path.with_name(DROPPED_FILE), "a", encoding="utf-8") as f:
        f.writelines(dropped)
    from scm_jax.files import write_text_atomic

    write_text_atomic(path, "".join(keep))
    return len(dropped)


class TensorBoardWriter(Writer):
    """TensorBoard event files through tensorboardX (imported here, not at module import)."""

    def __init__(self, logdir: str | os.PathLike, *, purge_step: int | None = None) -> None:
        """``purge_step``: TensorBoard hides the events of earlier files at steps >= it (a
        resumed run's restart marker; tensorboardX ``SummaryWriter(purge_step=...)``)."""
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboardX is a declared dependency
            raise ImportError(
                "TensorBoardWriter needs tensorboardX (`pip install tensorboardX`); "
                "or create_writers(..., tensorboard=False) for metrics.jsonl only"
            ) from e
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(logdir=str(self.logdir), purge_step=purge_step)
        self._closed = False

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One scalar summary per name (non-finite values are written as they are)."""
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(np.asarray(value)), global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8 ``(H, W, C)`` (C in 1, 3, 4) or ``(H, W)`` images, e.g. from ``make_grid``."""
        for name, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(
                    f"image {name!r} must be uint8 (H, W[, C]), got {image.dtype} {image.shape}"
                )
            fmt = "HW" if image.ndim == 2 else "HWC"
            self._writer.add_image(name, image, global_step=int(step), dataformats=fmt)

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """Text summaries, rendered as Markdown by TensorBoard."""
        for name, text in texts.items():
            self._writer.add_text(name, str(text), global_step=int(step))

    def flush(self) -> None:
        """Write pending events to the event file."""
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; idempotent."""
        if not self._closed:
            self._writer.close()
            self._closed = True


class MultiWriter(Writer):
    """Sends every call to each of ``writers`` in order; with none it is a no-op writer."""

    def __init__(self, writers: Iterable[Writer] = ()) -> None:
        self.writers: list[Writer] = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Fan out :meth:`Writer.write_scalars`."""
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Fan out :meth:`Writer.write_images`."""
        for w in self.writers:
            w.write_images(step, images)

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """Fan out :meth:`Writer.write_text`."""
        for w in self.writers:
            w.write_text(step, texts)

    def flush(self) -> None:
        """Flush every writer."""
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        """Close every writer."""
        for w in self.writers:
            w.close()


def create_writers(
    workdir: str | os.PathLike, *, tensorboard: bool = True, is_main_process: bool = True,
    start_step: int | None = None,
) -> MultiWriter:  # fmt: skip
    """The training loop's writers: ``workdir/metrics.jsonl`` plus, with ``tensorboard``,
    ``workdir/tensorboard/``. Non-main processes get an empty (no-op) MultiWriter.

    ``start_step``: the step the run starts (or resumes) at; rows logged after it by an
    earlier, interrupted run are dropped first (:func:`drop_rows_after`), and TensorBoard is
    told to hide the earlier event files' steps after it (``purge_step``; event files are
    append-only, so they are never rewritten)."""
    if not is_main_process:
        return MultiWriter()
    workdir = Path(workdir)
    if start_step is not None:
        drop_rows_after(workdir / METRICS_FILE, start_step)
    writers: list[Writer] = [JsonlWriter(workdir / METRICS_FILE)]
    if tensorboard:
        tb = workdir / TENSORBOARD_DIR
        earlier = start_step is not None and tb.is_dir() and any(tb.iterdir())
        writers.append(TensorBoardWriter(tb, purge_step=start_step + 1 if earlier else None))
    return MultiWriter(writers)
