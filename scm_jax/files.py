"""Atomic writes of output files, and checks of an output path before any slow work.

Every file the product writes (sample grids and arrays, FID statistics, evaluation JSON,
exports, caches, benchmark records, a workdir's JSON) goes through this module:

* :func:`atomic_write` yields a file object on a temporary file in the destination's folder
  (``.<name>.<random>.tmp``), flushes and fsyncs it, then ``os.replace``-s it over the
  destination and fsyncs the folder. A failure anywhere (an exception in the body, ``ENOSPC``
  in a write, the fsync or the rename) removes the temporary file and leaves an existing
  destination byte-identical; an ``OSError`` becomes a :class:`WriteError` whose message is
  one line (``could not write P: [Errno 28] No space left on device; P was left unchanged``).
* :func:`atomic_path` does the same for writers that take a path, not a file object
  (``safetensors.numpy.save_file``, ``torch.onnx.export``).
* :func:`staged_files` stages a writer's several files (an ONNX model and its ``.data``) in a
  hidden folder and renames each into place; :func:`replace_folder` swaps a complete folder
  in (post-hoc EMA exports).
* :func:`write_bytes_atomic`, :func:`write_text_atomic` and :func:`write_json_atomic` are the
  one-call forms.
* :func:`check_output_file` and :func:`check_output_folder` reject an output path that cannot
  be written (a folder where a file is expected, a read-only file or folder, a missing parent)
  with one line naming the path and what to do, before a command computes anything.

The temporary file is created with ``O_EXCL`` and mode 0o666 (the umask applies), so a
replaced file ends with the usual permissions, not a temporary file's 0600. A file with no
write permission bit counts as read-only even for root: ``os.replace`` would replace it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """An output could not be written; nothing was replaced (``str``: one line for the user)."""

    def __init__(self, path: Path, cause: OSError, existed: bool) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = path
        kept = f"{path} was left unchanged" if existed else f"{path} was not created"
        reason = f"[Errno {cause.errno}] {cause.strerror}" if cause.errno else str(cause)
        self.message = f"could not write {path}: {reason}; {kept}"

    def __str__(self) -> str:
        return self.message


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.<8 hex>.tmp`` (hidden, same folder)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create a new empty temporary file beside ``path``; ``(its path, an fd open for writing)``."""
    for _ in range(16):
        tmp = temp_name(path)
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def _fsync_folder(folder: Path) -> None:
    """fsync a folder so a rename in it survives a crash (skipped where the OS cannot)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:  # e.g. Windows cannot open folders
        if e.errno in (errno.EACCES, errno.EISDIR, errno.EINVAL):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # fs without dir fsync
            raise
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that takes a file name; on success
    the file is fsync'd and renamed over ``path`` (an existing file is replaced whole).

    The temporary file exists (empty, mode 0o666 less the umask) when yielded; a writer that
    recreates it with other permissions gets them reset. On any exception the temporary file
    is removed and ``path`` is untouched.

    Raises:
      WriteError: an ``OSError`` while writing, syncing or renaming (one-line message).
    """
    path = Path(path)
    existed = path.exists()
    try:
        tmp, fd = _create_temp(path)
    except OSError as e:
        raise WriteError(path, e, existed) from e
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        yield tmp
        if stat.S_IMODE(tmp.stat().st_mode) != mode:
            os.chmod(tmp, mode)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        if isinstance(e, WriteError):
            raise
        raise WriteError(path, e, existed) from e
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if fsync:  # the new file is in place: an error here is no WriteError ("left unchanged")
        _fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Yield a file object (``mode`` 'wb' or 'w') whose content replaces ``path`` atomically
    when the block ends without an exception.

    Args:
      path: the destination; its folder must exist (nothing is created).
      mode: ``'wb'`` (bytes) or ``'w'`` (text, ``encoding`` default UTF-8).
      fsync: flush and fsync the file before the rename and the folder after it.

    Raises:
      WriteError: an ``OSError`` in the block, the flush, the fsync or the rename: the
        temporary file is removed and an existing ``path`` left byte-identical.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path, fsync=False) as tmp:
        kw = {} if mode == "wb" else {"encoding": encoding or "utf-8", "newline": ""}
        with open(tmp, mode, **kw) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    if fsync:
        _fsync_folder(Path(path).parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`); returns ``path``."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`atomic_write`); returns ``path``."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    """``json.dumps(obj, **dumps)`` plus a newline, written atomically; returns ``path``.

    The text is made before the file is opened, so an unserialisable ``obj`` writes nothing.
    """
    return write_text_atomic(path, json.dumps(obj, **dumps) + "\n")


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, *, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a new hidden staging folder inside ``folder`` for a writer that makes several files
    named after each other (an ONNX model and its ``.data``); on success each file is fsync'd
    and renamed into ``folder`` (those named in ``last`` after the others), replacing any file
    of that name whole. On any exception the staging folder is removed and ``folder`` is
    untouched.

    Raises:
      WriteError: an ``OSError`` while writing, syncing or renaming (one-line message).
    """
    folder = Path(folder)
    stage = folder / f".staging.{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        stage.mkdir()
    except OSError as e:
        raise WriteError(folder, e, folder.exists()) from e
    try:
        yield stage
        names = sorted((f.name for f in stage.iterdir()), key=lambda n: (n in last, n))
        for name in names:
            fd = os.open(stage / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in names:
            os.replace(stage / name, folder / name)
        _fsync_folder(folder)
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise WriteError(folder, e, True) from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def replace_folder(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename the complete folder ``src`` to ``dest``; an existing ``dest`` is moved aside first
    and restored if the rename fails, then deleted (``src`` and ``dest`` in the same folder).

    Raises:
      WriteError: the renames failed; ``dest`` is as it was.
    """
    src, dest = Path(src), Path(dest)
    old = dest.with_name(f".{dest.name}.old.{secrets.token_hex(4)}{TMP_SUFFIX}")
    existed = dest.exists()
    try:
        if existed:
            os.rename(dest, old)
        try:
            os.rename(src, dest)
        except OSError:
            if existed:
                os.rename(old, dest)
            raise
    except OSError as e:
        raise WriteError(dest, e, existed) from e
    shutil.rmtree(old, ignore_errors=True)
    _fsync_folder(dest.parent)


def _read_only(path: Path) -> bool:
    """Not writable by this process, or with no write bit at all (read-only even for root)."""
    return not os.access(path, os.W_OK) or not stat.S_IMODE(path.stat().st_mode) & 0o222


def check_output_file(
    path: str | os.PathLike, flag: str = "--out", *, make_parents: bool = False
) -> Path:
    """Check that ``path`` can be written as a file: not a folder, its folder exists and is
    writable, and an existing file is writable (it would be replaced).

    Args:
      path: the output file as the user gave it.
      flag: the option that named it, for the message.
      make_parents: the writer creates missing folders: the nearest existing one must then be
        a writable folder.
    Returns:
      ``path`` as a Path.
    Raises:
      ValueError: one line naming the path and what to do.
    """
    p = Path(path)
    shown = repr(str(path))
    if str(path) == "":
        raise ValueError(f"{flag} '': give a file name")
    if p.is_dir():
        example = p / f"out{p.suffix}"
        raise ValueError(f"{flag} {shown} is a folder; give a file name, e.g. {example}")
    parent = p.parent
    while make_parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.exists():
        raise ValueError(f"{flag} {shown}: the folder {str(parent)!r} does not exist; create it")
    if p.exists() and _read_only(p):  # (then its parent is a folder)
        raise ValueError(
            f"{flag} {shown} is read-only; choose another file or make it writable (chmod u+w)"
        )
    _check_writable_folder(parent, flag, shown)
    return p


def _check_writable_folder(folder: Path, flag: str, shown: str) -> None:
    """The existing ``folder`` an output goes into must be a folder and writable (ValueError)."""
    if not folder.is_dir():
        raise ValueError(f"{flag} {shown} is not writable: {str(folder)!r} is a file, not a folder")
    if _read_only(folder):
        raise ValueError(f"{flag} {shown} is not writable: the folder {str(folder)!r} is read-only")


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check that ``path`` can be written as a folder: not a file, and it (or its nearest
    existing ancestor, where it will be created) is a writable folder.

    Raises:
      ValueError: one line naming the path and what to do.
    """
    p = Path(path)
    shown = repr(str(path))
    if str(path) == "":
        raise ValueError(f"{flag} '': give a folder (an empty path means the current folder)")
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {shown} is a file; give a folder (a new one or an earlier one)")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    _check_writable_folder(parent, flag, shown)
    return p
