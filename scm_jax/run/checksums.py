"""Checkpoint integrity: per-file checksums, write errors and a free-space check.

**Checksums.** Every checkpoint ``<step>/`` carries ``checksums.json``: the size and CRC-32 of
every file of its items (``state/``, ``emas/``, ``meta/``, paths relative to ``<step>/``). It is
computed after orbax has written and finalised the items but *before* it renames
``<step>.orbax-checkpoint-tmp`` to ``<step>`` (orbax's ``post_finalization_callback``, on its
background thread: training does not wait), so a complete checkpoint always has its checksums
and a killed save leaves only a temporary folder. Synchronous saves (``async_save=False``) write
it into ``<step>/`` afterwards, atomically (a temporary file and ``os.replace``).

Restores verify the files of the items they read (after orbax read them, so its own errors
for truncated or unreadable files come first and keep their messages); a size or CRC mismatch,
or a listed file that is missing, is a damaged checkpoint (:class:`ChecksumError`), handled like
any other (fall back to the previous checkpoint, set aside as ``<step>.damaged``). Checkpoints
written before checksums existed have no ``checksums.json``: they restore unverified (the
:class:`~scm_jax.run.checkpoint.Checkpointer` says so once).

Why files, not arrays: the digest is of exactly the bytes on disk (metadata and OCDBT manifests
included), needs no host copy of the state at save time (the loop donates its state to the next
step), and is the same for any sharding or process count. Multi-host: orbax finalises on every
process after its barrier; the main process writes the file (a shared filesystem, as orbax
requires), and each process verifies every ``process_count``-th file (a partition by sorted path)
- a mismatch seen by one process makes all fall back together (``restore_newest``'s agreement on
the oldest step). CRC-32 detects every burst of up to 32 flipped bits and other damage with
probability 1 - 2^-32 per file; it runs at ~4 GB/s per core
(``benchmarks/checkpoint_checksums.py``).

**Write errors.** :func:`write_error` turns an OS error of a checkpoint write (full disk,
read-only filesystem, permissions; raised by orbax or TensorStore) into one
:class:`CheckpointWriteError` line naming the step, the folder and the newest complete
checkpoint. :func:`check_free_space` warns before a save when the disk has less free space than
the checkpoint's size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax

from scm_jax.console import emit

CHECKSUMS_FILE = "checksums.json"
ALGORITHM = "crc32"
ITEMS = ("state", "emas", "meta")
_CHUNK = 16 << 20  # bytes read at a time
_THREADS = 4  # files hashed in parallel (zlib releases the GIL)
# TensorStore reports OS errors in its messages, e.g. "... [OS error 28: No space left on device]"
_OS_ERROR_TEXT = re.compile(
    r"OS error|Errno|No space left|Read-only file system|Permission denied|Disk quota|"
    r"File too large|Input/output error",
    re.IGNORECASE,
)


class ChecksumError(Exception):
    """A checkpoint file whose size or CRC differs from its ``checksums.json`` (or is gone)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, read-only filesystem, permissions, ...).

    The message is one line: the step, the folder, the OS error and the newest complete
    checkpoint (which is intact)."""


def file_crc(path: Path) -> int:
    """CRC-32 of a file's bytes (read in 16 MiB chunks)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: Path, items: Sequence[str]) -> list[str]:
    out = []
    for item in items:
        root = step_dir / item
        if root.is_dir():
            out += [p.relative_to(step_dir).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(out)


def _crcs(step_dir: Path, names: Sequence[str]) -> list[int]:
    with ThreadPoolExecutor(min(_THREADS, max(len(names), 1))) as pool:
        return list(pool.map(lambda n: file_crc(step_dir / n), names))


def compute_checksums(step_dir: str | Path, items: Sequence[str] = ITEMS) -> dict[str, Any]:
    """``{'algorithm': 'crc32', 'files': {relative path: {'size', 'crc32'}}}`` of the files of
    ``items`` under a checkpoint folder."""
    step_dir = Path(step_dir)
    names = _files(step_dir, items)
    crcs = _crcs(step_dir, names)
    sizes = [(step_dir / n).stat().st_size for n in names]
    files = {n: {"size": z, ALGORITHM: c} for n, z, c in zip(names, sizes, crcs, strict=True)}
    return {"algorithm": ALGORITHM, "files": files}


def write_checksums(step_dir: str | Path, items: Sequence[str] = ITEMS) -> Path:
    """Compute the checksums of a checkpoint folder and write ``checksums.json`` into it
    atomically (a temporary file renamed). Returns its path."""
    step_dir = Path(step_dir)
    data = compute_checksums(step_dir, items)
    out = step_dir / CHECKSUMS_FILE
    from scm_jax.files import write_json_atomic

    write_json_atomic(out, data, indent=0, sort_keys=True)
    return out


def verify_checksums(
    step_dir: str | Path, items: Sequence[str], *, process_index: int = 0, process_count: int = 1
) -> bool:
    """Check the files of ``items`` against the folder's ``checksums.json``.

    With several processes each checks every ``process_count``-th listed file (from
    ``process_index``). Returns False when the checkpoint has no checksums (written before they
    existed), True when every checked file matches.
    Raises:
      ChecksumError: a file of another size or CRC, a listed file missing, or an unreadable
        ``checksums.json``.
    """
    step_dir = Path(step_dir)
    path = step_dir / CHECKSUMS_FILE
    if not path.exists():
        return False
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data["algorithm"] != ALGORITHM:
            raise ChecksumError(f"{path}: unknown checksum algorithm {data['algorithm']!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise ChecksumError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    names = sorted(n for n in files if n.split("/", 1)[0] in items)
    names = names[process_index::process_count]
    for n in names:
        f = step_dir / n
        if not f.is_file():
            raise ChecksumError(f"checksum mismatch: {n} is missing")
        if f.stat().st_size != files[n]["size"]:
            raise ChecksumError(
                f"checksum mismatch: {n} has {f.stat().st_size} bytes, {files[n]['size']} written"
            )
    for n, crc in zip(names, _crcs(step_dir, names), strict=True):
        if crc != files[n][ALGORITHM]:
            raise ChecksumError(f"checksum mismatch: {n} (crc32 {crc:08x}, "
                                f"{files[n][ALGORITHM]:08x} written)")  # fmt: skip
    return True


def tmp_step_dir(directory: Path, step: int) -> Path:
    """The folder orbax writes checkpoint ``step`` into: ``<step>.orbax-checkpoint-tmp`` (this
    orbax's name), else the one ``<step>.orbax-checkpoint-tmp*`` folder there is.

    Raises:
      RuntimeError: none, or several and none of the exact name (an orbax that names them
        otherwise: the checksums cannot be placed).
    """
    exact = directory / f"{step}.orbax-checkpoint-tmp"
    if exact.is_dir():
        return exact
    found = [p for p in directory.glob(f"{step}.orbax-checkpoint-tmp*") if p.is_dir()]
    if len(found) != 1:
        raise RuntimeError(
            f"expected one temporary folder of checkpoint {step} in {directory}, found "
            f"{sorted(p.name for p in found)}"
        )
    return found[0]


def remove_partial(directory: Path, step: int, timeout: float = 60.0) -> Path | None:
    """Remove the temporary folder of a failed save of ``step`` (after orbax's background
    threads of that save, which may still write, end: up to ``timeout`` s); returns it."""
    for t in threading.enumerate():  # orbax's per-item writers (orbax's _SignalingThread)
        if type(t).__name__ == "_SignalingThread" and t is not threading.current_thread():
            t.join(timeout)
    try:
        partial = tmp_step_dir(directory, step)
    except RuntimeError:
        return None  # nothing was created (or it is ambiguous: left, orbax ignores it)
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def tree_nbytes(tree: Any) -> int:
    """Total bytes of a pytree's array leaves (global shapes)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def check_free_space(
    directory: Path, nbytes: int, step: int, log: Callable[[str], None], margin: float = 1.1
) -> bool:
    """Warn (one line) when ``directory``'s disk has less than ``margin`` x ``nbytes`` free.
    Returns whether there seemed to be enough."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return True  # nothing to compare with; a real write error is reported by the save
    if free >= margin * nbytes:
        return True
    log(f"warning: checkpoint {step} needs about {nbytes / 1e9:.2f} GB but {directory} has "
        f"{free / 1e9:.2f} GB free; the write will probably fail (free space or lower "
        "train.keep_checkpoints)")  # fmt: skip
    return False


def abandon_save(
    manager: Any, directory: Path, step: int, e: BaseException
) -> CheckpointWriteError | None:
    """After ``e`` ended the save of ``step`` of an ``ocp.CheckpointManager``: for an OS error,
    close the manager (quietly: it re-raises the same error), remove the partial folder (main
    process) and return the one-line :class:`CheckpointWriteError`; None for other errors (bugs,
    raised as they are; the manager is left as it is)."""
    newest = max((s for s in manager.all_steps() if s != step), default=None)
    err = write_error(step, directory, e, newest)
    if err is None:
        return None
    with contextlib.suppress(Exception):
        manager.close()
    if jax.process_index() == 0:
        remove_partial(directory, step)
    return err


def os_error_of(e: BaseException) -> BaseException | None:
    """The OS error in ``e``'s chain (an OSError, or a TensorStore error reporting one)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) or _OS_ERROR_TEXT.search(str(e)):
            return e
        e = e.__cause__ or e.__context__
    return None


def write_error(
    step: int, directory: Path, e: BaseException, newest: int | None
) -> CheckpointWriteError | None:
    """One-line :class:`CheckpointWriteError` for an OS error while writing checkpoint ``step``
    (None when ``e`` is no OS error: a bug, to be raised as it is)."""
    cause = os_error_of(e)
    if cause is None:
        return None
    if isinstance(cause, OSError) and cause.errno is not None:
        what = f"[Errno {cause.errno}] {os.strerror(cause.errno)}"
    else:
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        what = text[:300]
    kept = (f"the newest complete checkpoint (step {newest}) is intact" if newest is not None
            else "no earlier checkpoint exists")  # fmt: skip
    return CheckpointWriteError(f"could not write checkpoint {step} to {directory}: {what}; {kept}")


class _OrbaxWriteErrors(logging.Filter):
    """Drops orbax's reports (absl ERROR records with tracebacks, one per background thread) of
    the OS errors that :class:`~scm_jax.run.checkpoint.Checkpointer` reports as one
    :class:`CheckpointWriteError` line, and of its threads failing after the interpreter began
    to shut down (a run stopped at once: the previous checkpoint stays the newest)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname or record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        text = record.getMessage() + (f" {exc}" if exc is not None else "")
        if "cannot schedule new futures after" in text:
            return False
        return os_error_of(exc) is None and not _OS_ERROR_TEXT.search(record.getMessage())


def quiet_orbax_write_errors() -> None:
    """Install :class:`_OrbaxWriteErrors` on absl's logger (once)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxWriteErrors) for f in logger.filters):
        logger.addFilter(_OrbaxWriteErrors())


class CheckpointIntegrity:
    """The checksum and write-error half of :class:`~scm_jax.run.checkpoint.Checkpointer`
    (a base class: it uses the Checkpointer's ``directory``, ``manager``, ``_pending`` (the step
    being written), ``_closed`` and ``_unverified_noted``)."""

    directory: Path
    manager: Any
    _pending: int | None
    _closed: bool
    _unverified_noted: bool

    def _finalized(self) -> None:
        """orbax's post-finalisation callback (its thread): checksums into the temporary folder,
        before it is renamed to ``<step>``."""
        if jax.process_index() == 0 and self._pending is not None:
            write_checksums(tmp_step_dir(self.directory, self._pending))

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        """OS errors of the pending save -> one-line CheckpointWriteError (partial removed)."""
        try:
            yield
        except Exception as e:
            step, self._pending = self._pending, None
            if step is None or not (err := abandon_save(self.manager, self.directory, step, e)):
                raise
            self._closed = True
            raise err from e

    def _verify(self, step: int, items: tuple[str, ...]) -> None:
        """Check the files of ``items`` of checkpoint ``step`` against its checksums (after
        orbax read them: its own errors, e.g. for truncated files, come first); a checkpoint
        without checksums is noted once (stderr)."""
        ok = verify_checksums(self.directory / str(step), items,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())  # fmt: skip
        if not ok and not self._unverified_noted:
            self._unverified_noted = True
            emit(f"note: checkpoint {self.directory / str(step)} has no {CHECKSUMS_FILE} (written "
                 "before checkpoints recorded checksums): read unverified", sys.stderr)  # fmt: skip
