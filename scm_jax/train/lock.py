"""One trainer per workdir: an exclusive lock on ``<workdir>/.lock`` held for the whole run.

``scm-jax train`` (``scm_jax.train.loop.train``) takes the lock right after validating the config,
before it builds, loads, restores or compiles anything and before it writes ``config.json``; a
second trainer on the same workdir exits within seconds with one line::

    workdir runs/x is in use by pid 1234 on host h (since 2026-12-07 14:03, `scm-jax train ...`);
    wait for it to finish or use another --workdir

**Mechanism.** ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``.lock``, whose body is then the JSON
``{host, pid, started, command}`` of the holder. The kernel drops the lock when the process ends
in any way (kill -9 included), so a lock can never outlive its process. A clean exit (normal,
exception, SIGTERM / SIGINT stop) deletes the file; a ``.lock`` that exists but is not locked
therefore names a holder that died without cleaning up: the next trainer takes it over and says
so in one line (``taking over the lock of pid N on host H, which is no longer running``).
Acquiring checks that the file it locked is still the one at ``.lock`` (a holder may delete it
in between), so two trainers never both hold it.

**Filesystems.** Local filesystems and NFS (Linux emulates flock with NFS byte-range locks, held
by the server across clients) and Lustre mounted with ``-o flock`` give a lock that every host
sees. Where flock fails (``ENOLCK``, ``ENOSYS``, ``EOPNOTSUPP``: Lustre without ``flock``, some
FUSE filesystems) a plain lock file takes its place, created with ``O_CREAT | O_EXCL``, and a
line says so: a lock of this host is stale when its pid no longer runs (it is then taken over);
a lock of another host cannot be checked from here, so it is refused with a message saying how
to remove it. Lustre's ``localflock`` mount option makes flock node-local: there the lock only
keeps out trainers on the same node (not detectable from user space).

**Multi-host runs.** Only the coordinator (process 0, which writes the workdir's files) takes the
lock; the other processes of the same run proceed without it. A second multi-host run on the
workdir is refused by its coordinator, and the other processes then stop with it (their
coordination service loses the coordinator).

Read-only commands (``sample``, ``eval``, ``export``, ``phema``) neither take nor respect the
lock: they work while a run trains.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # flock not available


class WorkdirLockError(ValueError):
    """The workdir cannot be created or locked (``scm-jax train`` prints one line, exit 2)."""


class WorkdirInUseError(WorkdirLockError):
    """Another trainer holds the workdir (``scm-jax train`` prints it as one line, exit 2)."""


def this_command() -> str:
    """The command line of this process, as a user would type it (``scm-jax train ...``)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if name in ("__main__.py", "-m"):
        name = "scm-jax"
    elif name == "-c":
        name = "python -c"
    return shlex.join([name, *sys.argv[1:]])


def is_coordinator() -> bool:
    """Whether this is process 0 of the run, without starting JAX's backend (which can take
    seconds on accelerators): ``jax.distributed``'s process id, 0 when it was not initialised."""
    from jax._src import distributed  # what jax.process_index() reads once the backend is up

    return int(getattr(distributed.global_state, "process_id", 0) or 0) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_body(fd: int) -> dict[str, Any] | None:
    """The holder's JSON body; None when empty or not (yet) valid JSON."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        body = json.loads(data.decode("utf-8", "replace")) if data.strip() else None
    except json.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def describe(body: dict[str, Any] | None) -> str:
    """``pid 1234 on host h (since 2026-12-07 14:03, `scm-jax train ...`)`` of a lock body."""
    if body is None:
        return "another process (its lock file holds no details yet)"
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(body.get("started", 0))))
    command = str(body.get("command", "?"))
    command = command if len(command) <= 300 else command[:297] + "..."
    who = f"pid {body.get('pid', '?')} on host {body.get('host', '?')}"
    return f"{who} (since {since}, `{command}`)"


class WorkdirLock:
    """The exclusive lock of a workdir; a context manager (module docstring).

    Args:
      workdir: the run's folder (created if missing; removed again on release if it was created
        here and is still empty, so a refused or failed run leaves nothing behind).
      log: where the take-over and fallback lines go.
      enabled: False for the non-coordinator processes of a multi-host run (no lock).
      command: the command recorded in the lock (default: this process's command line).
    Raises (on entering / :meth:`acquire`):
      WorkdirLockError: the folder cannot be created or the lock file written.
      WorkdirInUseError: another live trainer holds the lock, or (plain lock file only) a lock of
        another host whose liveness cannot be checked.
    """

    def __init__(
        self, workdir: str | os.PathLike, *, log: Callable[[str], None] = print,
        enabled: bool = True, command: str | None = None,
    ) -> None:  # fmt: skip
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.log = log
        self.enabled = enabled
        self.command = this_command() if command is None else command
        self.mode: str | None = None  # "flock" | "file" while held
        self._fd: int | None = None
        self._created: list[Path] = []

    def _body(self) -> bytes:
        body = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                "command": self.command}  # fmt: skip
        return (json.dumps(body, sort_keys=True) + "\n").encode()

    def _in_use(self, body: dict[str, Any] | None) -> WorkdirInUseError:
        return WorkdirInUseError(f"workdir {self.workdir} is in use by {describe(body)}; wait for "
                                 "it to finish or use another --workdir")  # fmt: skip

    def _write(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, self._body())
        os.fsync(fd)

    def _taking_over(self, body: dict[str, Any] | None) -> None:
        who = "a previous run" if body is None else (
            f"pid {body.get('pid', '?')} on host {body.get('host', '?')}")  # fmt: skip
        self.log(f"taking over the lock of {who}, which is no longer running ({self.path})")

    def _make_workdir(self) -> None:
        missing, p = [], self.workdir
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._created = missing  # innermost first

    def _open(self) -> tuple[int, bool]:
        """``(fd of .lock, whether this call created it)``."""
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                pass
            try:
                return os.open(self.path, os.O_RDWR), False
            except FileNotFoundError:  # deleted in between by a holder that finished
                continue

    def acquire(self) -> WorkdirLock:
        """Take the lock (see the class); returns self."""
        if not self.enabled or self._fd is not None:
            return self
        try:
            return self._acquire()
        except OSError as e:  # not a folder, no permission, a full disk ...
            raise WorkdirLockError(
                f"cannot create or lock the workdir {self.workdir}: "
                f"{e.strerror or e} ({e.filename or self.path})"
            ) from None

    def _acquire(self) -> WorkdirLock:
        self._make_workdir()
        try:
            while True:  # until the locked file is the one at .lock (a holder may delete it)
                fd, created = self._open()
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    body = None
                    for _ in range(20):  # the holder writes its body right after locking
                        if (body := _read_body(fd)) is not None:
                            break
                        time.sleep(0.05)
                    os.close(fd)
                    raise self._in_use(body) from None
                except OSError as e:
                    if e.errno not in UNSUPPORTED or not created:
                        os.close(fd)
                    if e.errno not in UNSUPPORTED:
                        raise
                    return self._acquire_file(e, fd if created else None)
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            body = _read_body(fd)
            if body is not None or os.fstat(fd).st_size:  # a holder that did not clean up
                self._taking_over(body)
            self._write(fd)
        except BaseException:
            self._remove_created()
            raise
        self._fd, self.mode = fd, "flock"
        return self

    def _acquire_file(self, why: OSError, fd: int | None) -> WorkdirLock:
        """The plain lock file where flock is unsupported (module docstring); ``fd``: the
        ``.lock`` that the flock attempt created exclusively (it is ours), else None."""
        self.log(f"note: {self.workdir} does not support flock ({os.strerror(why.errno)}); using "
                 "a plain lock file (a stale lock is detected on the same host only)")  # fmt: skip
        here = socket.gethostname()
        while fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                pass
            try:
                with open(self.path, "rb") as f:
                    body = _read_body(f.fileno())
            except FileNotFoundError:
                continue
            host, pid = (body or {}).get("host"), (body or {}).get("pid")
            if host == here and isinstance(pid, int) and not _pid_alive(pid):
                self._taking_over(body)
                self.path.unlink(missing_ok=True)
                continue
            if body is not None and host != here:
                raise WorkdirInUseError(
                    f"workdir {self.workdir} is locked by {describe(body)}; this filesystem has "
                    "no working flock, so whether that process still runs cannot be checked "
                    f"from here: if it does not, delete {self.path} and run again"
                )
            raise self._in_use(body)
        self._write(fd)
        self._fd, self.mode = fd, "file"
        return self

    def _remove_created(self) -> None:
        for p in self._created:  # innermost first; only folders made here and still empty
            try:
                p.rmdir()
            except OSError:
                break
        self._created = []

    def release(self) -> None:
        """Delete the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                self.path.unlink()  # before unlocking: nobody can lock the deleted file after us
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)  # drops the flock
            self._fd, self.mode = None, None
        self._remove_created()

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
