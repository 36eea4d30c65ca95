"""The console: the one line writer, surviving a reader going away, and durations (building block).

Every program's progress and warning lines go through :func:`emit` (the training loop, checkpoint
writes and restores, evaluation), so ``scm-jax train ... | tee log`` keeps training after the
pipe closes.
"""

from __future__ import annotations

import math
import os
import sys
from typing import TextIO


def emit(line: str, stream: TextIO | None = None) -> None:
    """Print ``line`` to ``stream`` (default stdout) and flush it.

    A reader that went away (``scm-jax train ... | tee log`` after Ctrl-C stopped ``tee``, a
    closed terminal or log collector) must not stop training or its final checkpoint: on a
    broken pipe the stream's file descriptor is pointed at ``os.devnull`` and the run goes on
    without console output (its metrics still go to ``metrics.jsonl`` and TensorBoard).
    """
    stream = sys.stdout if stream is None else stream
    try:
        print(line, file=stream, flush=True)
    except (BrokenPipeError, ConnectionResetError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:  # later writes (and the interpreter's flush at exit) go nowhere instead of failing
            os.dup2(null, stream.fileno())
        except (OSError, ValueError):  # no descriptor to redirect: the next write fails again
            pass
        finally:
            os.close(null)


def format_duration(seconds: float) -> str:
    """Human duration: ``'12.3s'`` under a minute, ``'5m12s'`` under an hour, then ``'1h03m'``,
    and ``'2d03h'`` from a day; ``'?'`` for a negative or non-finite value."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 3600:
        m, s = divmod(whole, 60)
        return f"{m}m{s:02d}s"
    minutes = round(seconds / 60)
    if minutes < 24 * 60:
        h, m = divmod(minutes, 60)
        return f"{h}h{m:02d}m"
    d, h = divmod(round(seconds / 3600), 24)
    return f"{d}d{h:02d}h"
