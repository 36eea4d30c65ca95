"""Orbax's console noise after a failed restore, and only that, kept off the console.

A damaged checkpoint is reported as one :class:`scm_jax.run.checkpoint.CheckpointError` line;
the asynchronous reads orbax and TensorStore abandon when a restore fails would otherwise print
tracebacks long after that error was handled (docs/reliability.md, "Checkpoints").
"""

from __future__ import annotations

import logging
import sys
from typing import Any


class _AbandonedReads(logging.Filter):
    """Drops asyncio's "exception was never retrieved" reports of TensorStore reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            "exception was never retrieved" in record.getMessage() and "tensorstore" in str(exc)
        )


_ABANDONED_IN = ("/orbax/", "/tensorstore/")  # packages whose collected coroutines are dropped


def ignore_closed_loop_callbacks() -> None:
    """Orbax restores in a fresh asyncio loop that it closes as soon as the first read fails;
    the TensorStore reads still pending then call back into the closed loop (Python reports
    ``RuntimeError('Event loop is closed')`` through ``sys.unraisablehook``), and those that
    failed too are garbage-collected with "Task exception was never retrieved" (asyncio's
    logger): tracebacks on the console, some while the failing restore still runs, long after
    its error was handled, and coroutines of orbax / TensorStore abandoned in that loop are
    reported as "Exception ignored in: <coroutine ...>" when collected. Drop exactly those
    reports (installed once, by the first Checkpointer); the error itself is reported as a
    :class:`CheckpointError`."""
    previous = sys.unraisablehook
    if getattr(previous, "_scm_jax_closed_loop", False):
        return
    logging.getLogger("asyncio").addFilter(_AbandonedReads())

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == (
            "Event loop is closed"
        ):
            return
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
        if code is not None and any(m in code.co_filename for m in _ABANDONED_IN):
            return
        previous(unraisable)

    hook._scm_jax_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
