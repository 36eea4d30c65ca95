"""Console progress of the training loop: one status line per logging interval.

    step 1200/5000 (24.0%)  kimg 153.6  loss 0.1234  grad 1.23  1534 img/s  0.08 s/step  ETA 5m12s

Throughput is measured between consecutive :meth:`Progress.update` calls. The first interval
after start (or resume) contains XLA compilation, so it is reported once as compile time and
gives no rate; the ETA uses an exponential moving average of the step time (half weight on the
newest interval), so one slow interval (an evaluation) moves it only part of the way. Call
:meth:`Progress.restart_timer` after a pause that should not count (evaluation, checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from scm_jax.console import format_duration

# Scalars shown on the line by default: metric name -> label.
DEFAULT_SHOW: dict[str, str] = {"loss": "loss", "grad_norm": "grad"}

_EMA_NEW = 0.5  # weight of the newest interval in the smoothed step time


def _fmt_rate(images_per_s: float) -> str:
    return f"{images_per_s:.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


class Progress:
    """One-line training status with throughput, compile time and ETA.

    Args:
      total_steps: the step count at which training ends.
      start_step: the step training starts (or resumes) from.
      batch_size: global images per step (for kimg and img/s).
      print_fn: where lines go (``print``, ``logging.info``, or ``None`` to only return them).
      clock: seconds, monotonic; the timer starts when the object is created.
      show: scalar name -> label of the values shown on the line (default loss and grad norm).

    After each :meth:`update`: ``images_per_s``, ``step_time_s`` (None on the first update),
    ``eta_s`` and ``compile_time_s`` (set by the first update) hold the measured numbers;
    :meth:`timing_scalars` gives them as a dict for the metric writers.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        *,
        batch_size: int,
        print_fn: Callable[[str], object] | None = print,
        clock: Callable[[], float] = time.monotonic,
        show: Mapping[str, str] | None = None,
    ) -> None:
        if total_steps <= 0 or batch_size <= 0:
            raise ValueError(f"need total_steps, batch_size > 0; got {total_steps}, {batch_size}")
        self.total_steps = int(total_steps)
        self.batch_size = int(batch_size)
        self.show = dict(DEFAULT_SHOW if show is None else show)
        self._print = print_fn
        self._clock = clock
        self._prev_step = int(start_step)
        self._prev_time = clock()
        self._first = True
        self._compiled_now = False
        self._smoothed_step_time: float | None = None
        self.images_per_s: float | None = None
        self.step_time_s: float | None = None
        self.eta_s: float | None = None
        self.compile_time_s: float | None = None

    def restart_timer(self, step: int) -> None:
        """Start the next interval now at ``step``: time since the last update is not counted."""
        self._prev_step = int(step)
        self._prev_time = self._clock()

    def update(self, step: int, scalars: Mapping[str, float] | None = None) -> str:
        """Measure the interval since the previous update, print and return the status line.

        Args:
          step: steps completed so far (global, counted from 0).
          scalars: metric values; those named in ``show`` appear on the line.
        Returns:
          The line (also passed to ``print_fn``).
        """
        now = self._clock()
        steps = int(step) - self._prev_step
        elapsed = now - self._prev_time
        self.images_per_s = self.step_time_s = None
        self._compiled_now = self._first
        parts = [
            f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)",
            f"kimg {step * self.batch_size / 1000:.1f}",
        ]
        for name, label in self.show.items():
            if scalars is not None and name in scalars:
                parts.append(f"{label} {float(scalars[name]):.4g}")
        if self._first:
            self._first = False
            self.compile_time_s = elapsed
            what = "first step" if steps == 1 else f"first {steps} steps"
            parts.append(f"{what} (incl. compile) {format_duration(elapsed)}")
        elif steps > 0 and elapsed > 0:
            self.step_time_s = elapsed / steps
            self.images_per_s = steps * self.batch_size / elapsed
            s = self._smoothed_step_time
            s = self.step_time_s if s is None else _EMA_NEW * self.step_time_s + (1 - _EMA_NEW) * s
            self._smoothed_step_time = s
            self.eta_s = max(self.total_steps - int(step), 0) * s
            parts += [
                f"{_fmt_rate(self.images_per_s)} img/s",
                f"{self.step_time_s:.3g} s/step",
                f"ETA {format_duration(self.eta_s)}",
            ]
        self._prev_step, self._prev_time = int(step), now
        line = "  ".join(parts)
        if self._print is not None:
            self._print(line)
        return line

    def timing_scalars(self) -> dict[str, float]:
        """The last update's measurements: ``images_per_s`` and ``step_time_s`` when measured,
        ``compile_time_s`` right after the first update only."""
        out: dict[str, float] = {}
        if self.images_per_s is not None and self.step_time_s is not None:
            out["images_per_s"] = self.images_per_s
            out["step_time_s"] = self.step_time_s
        if self._compiled_now and self.compile_time_s is not None:
            out["compile_time_s"] = self.compile_time_s
        return out
