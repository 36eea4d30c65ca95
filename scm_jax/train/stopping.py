"""Why a run stops early: stop signals and preemption notices, and runs of non-finite steps.

**Signals** (:class:`StopSignals`). SIGTERM (a scheduler's preemption notice) or SIGINT (Ctrl-C)
lets the current step finish; the loop then writes a checkpoint and returns. A second signal
lets that checkpoint write finish (one line says so; interrupting it used to leave orbax's
background threads failing with tracebacks at exit) and a third stops at once (``os._exit``,
quiet; the incomplete checkpoint is a temporary folder orbax ignores, so the previous one stays
the newest). The loop's last checkpoint write is covered the same way
(:meth:`StopSignals.writing`). With several processes the stop must happen at the same step
everywhere (one process saving while another waits in a collective would hang), so:

* where JAX's preemption service runs (``jax.distributed.initialize`` with
  ``jax_enable_preemption_service``, the default), SIGTERM is left to it: its notifier tells the
  coordination service, which picks a step every process will reach, and
  ``multihost_utils.reached_preemption_sync_point(step)`` (what orbax's
  ``CheckpointManager.reached_preemption`` calls), asked before every step, is true at that step
  on every process. It costs no collective per step. SIGINT still takes the path below;
* otherwise every process exchanges its flag (a small all-gather) every
  :data:`STOP_SYNC_STEPS` steps and all stop if any was signalled.

A single process stops after the step during which the signal arrived.

**Non-finite steps** (:class:`NonfiniteGuard`). The train step leaves the parameters, optimiser
state and EMAs unchanged when its loss or gradient norm is not finite and reports
``nonfinite_steps`` = 1 (``scm_jax.train.step``). The guard counts those steps on the device (in
a row and in total) and reads the counts **one step late**: after dispatching step s it reads
the counts of step s - 1, which has normally finished by then, so the device always has the next
step queued and the loop adds no wait of its own. It logs each skipped step and asks the loop to
stop after ``max_consecutive`` skipped steps in a row (0 = never). The loop then writes a
checkpoint (the parameters are those of the last good step; the step counter and the data
position include the skipped steps, so a resume continues with the next batch) and raises
:class:`NonfiniteStepsError`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STOP_SYNC_STEPS = 10  # multi-process runs without the preemption service agree this often


def preemption_service_running() -> bool:
    """Whether JAX's preemption sync manager is up (multi-process runs that enabled it)."""
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - a jax without that module
        return False
    state = distributed.global_state
    return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None


class StopSignals:
    """SIGTERM / SIGINT -> stop after the current step (a context manager; module docstring).

    ``should_stop(step)`` is asked before every step and gives the same answer on every
    process; ``signum`` is the signal that stopped the run (None while running).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._later = 0  # signals after the first (or during a write after the loop)
        self._in_write = False
        self._log: Callable[[str], None] = _stderr
        self.preemption = jax.process_count() > 1 and preemption_service_running()

    def should_stop(self, step: int) -> bool:
        """Whether to stop before ``step`` (the same answer on every process)."""
        if jax.process_count() == 1:
            return self.signum is not None
        if self.preemption:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = int(signal.SIGTERM)
                return True
        if step % STOP_SYNC_STEPS:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        self.signum = int(np.max(flags)) or None
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            # With the preemption service, SIGTERM belongs to JAX's notifier (installing a
            # Python handler would replace it).
            for s in self._signals():
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _signals(self) -> tuple[int, ...]:
        return (signal.SIGINT,) if self.preemption else (signal.SIGTERM, signal.SIGINT)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None and not self._in_write:
            self.signum = signum
            return
        self.signum = self.signum or signum
        self._later += 1
        if self._later == 1:  # the run is stopping: let its checkpoint be written
            self._log(f"signal {signum}: stopping once the checkpoint is written (another "
                      "signal stops at once, without it)")  # fmt: skip
            return
        self._log(f"signal {signum} again: stopped at once; the checkpoint being written is "
                  "incomplete (ignored), the previous one stays the newest")  # fmt: skip
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._old = {}

    @contextlib.contextmanager
    def writing(self, log: Callable[[str], None]) -> Iterator[None]:
        """Around a checkpoint write after the loop: the handlers are installed again, so a
        signal now stops the run once the write is done (it is the run's second signal, or
        its first: the loop had ended) and another stops at once (module docstring). ``log``
        gets the line about it."""
        self._log, self._in_write = log, True
        installed = {}
        if threading.current_thread() is threading.main_thread():
            installed = {s: signal.signal(s, self._handle) for s in self._signals()}
        try:
            yield
        finally:
            self._in_write = False
            for s, h in installed.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class NonfiniteStepsError(RuntimeError):
    """Training stopped after too many non-finite steps in a row (a checkpoint was written)."""


@jax.jit
def _count(counts: dict[str, jax.Array], skipped: jax.Array) -> dict[str, jax.Array]:
    bad = jnp.asarray(skipped > 0, jnp.int32)
    return {"in_a_row": (counts["in_a_row"] + bad) * bad, "total": counts["total"] + bad}


class NonfiniteGuard:
    """Counts skipped (non-finite) steps and says when to stop (module docstring).

    Args:
      max_consecutive: K; stop after K skipped steps in a row (0: never).
      total, in_a_row: the counts at the start (a resumed run's, from its checkpoint's meta).
      log: where the line about each skipped step goes.

    Host-side counts after the last read: ``total``, ``in_a_row``, ``first_bad_step`` (the
    first step of the current run of skipped steps, 1-based as in the progress lines).
    """

    def __init__(
        self, max_consecutive: int, *, total: int = 0, in_a_row: int = 0,
        log: Callable[[str], None] = print,
    ) -> None:  # fmt: skip
        self.max_consecutive = int(max_consecutive)
        self.total, self.in_a_row = int(total), int(in_a_row)
        self.first_bad_step: int | None = None
        self._log = log
        self._counts = {"in_a_row": jnp.int32(in_a_row), "total": jnp.int32(total)}
        self._pending: tuple[int, dict[str, jax.Array]] | None = None

    def after_step(self, step: int, values: dict[str, jax.Array]) -> bool:
        """Record the step that brought the counter to ``step`` (1-based) from its ``values``
        and read the previous step's counts (unless :meth:`sync` already did). Returns
        :attr:`should_stop`."""
        self._counts = _count(self._counts, values["nonfinite_steps"])
        previous, self._pending = self._pending, (step, self._counts)
        if previous is not None:
            self._read(*previous)
        return self.should_stop

    def sync(self) -> bool:
        """Read the newest counts now (waits for the last step: call it where the loop waits
        anyway, at logging, checkpoints and the end). Returns :attr:`should_stop`."""
        if self._pending is not None:
            previous, self._pending = self._pending, None
            self._read(*previous)
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        """Whether the last read found K skipped steps in a row."""
        return self.max_consecutive > 0 and self.in_a_row >= self.max_consecutive

    def _read(self, step: int, counts: dict[str, jax.Array]) -> None:
        in_a_row, total = (int(v) for v in jax.device_get((counts["in_a_row"], counts["total"])))
        if total > self.total:
            self.first_bad_step = step - in_a_row + 1
            self._log(
                f"step {step}: loss or gradient not finite; step skipped, parameters unchanged "
                f"({in_a_row} in a row, {total} in total)"
            )
        self.total, self.in_a_row = total, in_a_row

    def stop_message(self, step: int) -> str:
        """The error after stopping at ``step`` (checkpoint written)."""
        first = self.first_bad_step or step - self.in_a_row + 1
        good = (f"the parameters of step {first - 1}, the last good one" if first > 1
                else "the initial parameters")  # fmt: skip
        return (
            f"stopped at step {step}: the last {self.in_a_row} steps (from step {first}) had a "
            f"non-finite loss or gradient and were skipped (train.max_consecutive_nonfinite="
            f"{self.max_consecutive}; {self.total} skipped in total). The checkpoint at step "
            f"{step} holds {good}; resuming continues with the next batch. Lower "
            "optim.lr or set optim.grad_clip, check the data, or raise "
            "train.max_consecutive_nonfinite (0 = never stop)"
        )
